"""Side-by-side benchmark: every arm in its own process, same model and tokens.

    python -m mst_compile.bench                                  # the headline: torch.compile vs mst vs F.linear_cross_entropy
    python -m mst_compile.bench --full                           # every arm (eager, checkpointing, peers, ...)
    python -m mst_compile.bench --tokens 2048,8192,16384 --out bench_out
    python -m mst_compile.bench --ablate 4,8,16,32,64 --tokens 8192   # mst at fixed chunk counts vs automatic
    python -m mst_compile.bench --ablate min_chunk_tokens=128 --model qwen-vocab   # any mst option
    python -m mst_compile.bench --cap-mib 1024 --arms eager,compile,mst  # longest sequence under a memory cap

Prints a table of peak MiB of one step, the analytic estimate (``floor.py``), the peak ratio and the median
step-time ratio against ``torch.compile`` default (the strongest baseline). ``results.json``, ``results.csv``
and ``table.txt`` are rewritten after each run, ``peak_vs_tokens.png`` is drawn at the end; Ctrl-C stops the
running arm's process and keeps, prints and plots what finished. Forms: ``step`` compiles a function returning
only the loss; ``model`` compiles the model itself, which returns the logits too (the one-line use).
``--cold`` gives every process an empty Inductor cache, so ``compile_s`` is a cold compile.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

from . import output
from .cli import parser
from .deps import require
from .measure import run_worker
from .worker import ARMS, EXTRA_ARMS, FORMS, STEP_ONLY


def _progress(total: int):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="bench", file=sys.stderr, dynamic_ncols=True)
    except ImportError:  # tqdm is optional: plain lines instead
        return None


def measure(arm: str, form: str, tokens: int, a, options: dict | None = None) -> dict:
    args = ["--arm", arm, "--form", form, "--tokens", str(tokens), "--model", a.model, "--steps", str(a.steps),
            "--warmup", str(a.warmup), "--dtype", a.dtype] + (["--device", a.device] if a.device else [])  # fmt: skip
    if options:
        args += ["--options", json.dumps(options)]
    env = None
    if a.cold:
        env = {"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="mst_bench_cache_")}
    r = run_worker(args, env=env)
    r.update(arm=arm if not options else f"mst[{','.join(f'{k}={v}' for k, v in options.items())}]", form=form,
             tokens=tokens)  # fmt: skip
    return r


def _ablations(spec: str) -> list[dict]:
    """``--ablate 8,16`` -> fixed chunk counts; ``--ablate min_chunk_tokens=128`` or ``causal_mask=0`` -> any mst
    option, its value read as the environment variable's would be; ``a=1+b=2``: both options in one arm."""
    from ..config import parse_option

    out = []
    for item in filter(None, spec.split(",")):
        opts = {}
        for part in item.split("+"):
            key, _, value = part.rpartition("=")
            key = key or "num_chunks"
            opts[key] = parse_option(key, value)  # typed as the option is (causal_mask=0 is False)
        out.append(opts)
    return out


def _jobs(a, arms, forms, tokens_list):
    jobs = []
    for form in forms:
        for tokens in tokens_list:
            jobs += [(arm, form, tokens, None) for arm in arms if not (form == "model" and arm in STEP_ONLY)]
            jobs += [("mst", form, tokens, opts) for opts in _ablations(a.ablate)]
    return jobs


#: the default arms: the strongest baseline, mst and the strongest peer measured (``F.linear_cross_entropy``,
#: chunked and compiled; step form only): a first run shows the headline in a few minutes
HEADLINE = ("compile", "mst", "linear_ce")

def selected_arms(arms: str | None, full: bool) -> list[str]:
    """``--arms`` as a list: the headline by default, every arm with ``--full`` or ``all``."""
    arms = arms or ("all" if full else ",".join(HEADLINE))
    return list(ARMS + EXTRA_ARMS) if arms == "all" else arms.split(",")


#: ``python -m mst_compile.bench TOOL ...``: the benchmark's companion checks, each its own module
TOOLS = {"gpu-check": "gpu_check", "chunk-cost": "chunk_cost", "alternate": "alternate", "gemms": "gemms"}


def main(argv=None) -> int:
    import importlib

    from .models import CONFIGS
    from .zoo import ARCHS as ZOO

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TOOLS:
        return importlib.import_module(f".{TOOLS[argv[0]]}", __package__).main(argv[1:])

    p = parser("python -m mst_compile.bench", __doc__)
    p.epilog = ("other tools: python -m mst_compile.bench gpu-check (the few-minute GPU check) | chunk-cost (ops and "
                "bytes per chunk) | alternate (two arms' steps interleaved in one process) | gemms (every GEMM of a "
                "step, with its operands' layouts); each takes --help")  # fmt: skip
    p.add_argument("--model", default="llama-small", help=f"one of {', '.join(CONFIGS)} (bench/models.py), or "
                   f"zoo:ARCH with ARCH one of {', '.join(ZOO)}, nanogpt")  # fmt: skip
    p.add_argument("--tokens", default="2048", help="comma-separated token counts (batch 1)")
    p.add_argument("--arms", default=None, help=f"comma-separated, from: {', '.join(ARMS + EXTRA_ARMS)}; all: every "
                   f"one (default: {','.join(HEADLINE)}, the headline; all with --full)")  # fmt: skip
    p.add_argument("--full", action="store_true", help="every arm (--arms all): about 26 runs of a minute or more "
                   "each on a CPU")  # fmt: skip
    p.add_argument("--forms", default=",".join(FORMS), help="comma-separated: step (a compiled function returning the "
                   "loss), model (the compiled model, logits returned too; every arm but " + ", ".join(STEP_ONLY) + ")")
    p.add_argument("--steps", type=int, default=3, help="measured steps per arm (the table shows medians)")
    p.add_argument("--warmup", type=int, default=2, help="steps before the measured ones (the first compiles)")
    p.add_argument("--dtype", default="float32", help="parameter dtype")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default="bench_out", help="folder for results.json, results.csv, table.txt, the plot")
    p.add_argument("--ablate", default="",
                   help="also run mst with these fixed chunk counts, or options as key=value (comma-separated arms; "
                        "a=1+b=2: two options in one arm)")
    p.add_argument("--cap-mib", type=float, default=0,
                   help="search the longest sequence under this peak per arm instead (0: no search)")
    p.add_argument("--cap-start", type=int, default=1024, help="first length of the cap search")
    p.add_argument("--cap-max", type=int, default=131072, help="longest length the cap search tries")
    p.add_argument("--cold", action="store_true", help="an empty Inductor cache per process (cold compile time)")
    a = p.parse_args(argv)
    arms = selected_arms(a.arms, a.full)
    forms = a.forms.split(",")
    for arm in arms:
        if arm not in ARMS + EXTRA_ARMS:
            p.error(f"unknown arm {arm!r}; arms: {ARMS + EXTRA_ARMS}")
    if a.model != "zoo:nanogpt":
        require("transformers", "the benchmark's models")
    os.makedirs(a.out, exist_ok=True)
    if a.cap_mib:
        from .search import longest_under_cap

        rows: list[dict] = []
        try:
            save = lambda: output.save_cap(rows, a.out, a.cap_mib)  # noqa: E731 - after each arm's search
            longest_under_cap(arms, forms, a, measure, rows=rows, on_row=save)
        except KeyboardInterrupt:
            print(f"[cap] interrupted: {len(rows)} arms finished, kept in {a.out}/", file=sys.stderr)
            output.write_cap(rows, a.out, a.cap_mib)
            return 130
        output.write_cap(rows, a.out, a.cap_mib)
        return 0
    jobs = _jobs(a, arms, forms, [int(t) for t in a.tokens.split(",")])
    print(f"[bench] {len(jobs)} runs, each in its own process; {a.out}/results.json and table.txt are updated "
          "after each one (Ctrl-C stops the run and keeps what finished)", file=sys.stderr, flush=True)  # fmt: skip
    bar, rows = _progress(len(jobs)), []
    try:
        for arm, form, tokens, options in jobs:
            r = measure(arm, form, tokens, a, options)
            rows.append(r)
            output.add_ratios(rows)
            output.save(rows, a.out)
            done = f"{r['peak_mib']:.0f} MiB, {r['step_s_median']:.2f} s/step" if "peak_mib" in r else "failed"
            if bar is not None:
                bar.set_postfix_str(f"{form} {tokens} {r['arm']}: {done}")
                bar.update()
            else:
                print(f"[bench] {form} {tokens} {r['arm']}: {done}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        print(f"[bench] interrupted: {len(rows)} of {len(jobs)} runs finished, kept in {a.out}/", file=sys.stderr)
        output.write(rows, a.out)
        return 130
    if bar is not None:
        bar.close()
    output.write(rows, a.out)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
