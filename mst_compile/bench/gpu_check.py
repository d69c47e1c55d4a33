"""``python -m mst_compile.bench gpu-check``: the few-minute check to run whenever a GPU is available.

Prints a table of these rows (each row also as one JSON line the moment it is measured):
1. parity in bf16 (bf16 parameters, and fp32 parameters under autocast) of a tiny HF Llama and of a nanoGPT-style
   model: the loss's dtype (equal to eager's), the loss and every gradient against an fp64 run of the same
   weights, mst no further from it than eager (relative error, max |a-b| / max |b|; 1.25x eager's + a floor);
2. the same with CUDA graphs (``options={"inductor": {"triton.cudagraphs": True}}``), one precision per model;
3. one Llama-8B-shaped MLP layer (H=4096, I=14336, SwiGLU) and head + cross-entropy (V=128256) in bf16 at 1K and
   8K tokens: forward + backward time by CUDA events, median of a few steps, mst vs the same region under
   ``torch.compile``, mst's own plan, and fixed chunks (the MLP in 4, the head in 8: NOTE [fixed-chunk arms])
   with and without the fp32-output weight-gradient GEMMs (NOTE [weight-gradient accumulation]) and with the
   chunk bodies op by op instead of compiled (NOTE [compiled bodies]), each row saying whether mst chunked;
   ``max_memory_allocated`` / ``max_memory_reserved`` of the step above their values at its start. A row whose
   compiled bodies fell back to op by op is not ok: its time is not of the code its arm names.

``--device cpu --small`` runs the same code on tiny shapes (the suite's smoke test); the numbers mean nothing
there.

Made for a short lease of a GPU machine, where nothing is installed and every compile is cold: it runs from a
plain checkout on the torch it finds (the ``mst`` backend registered by name when the package's entry point is
not installed), prints each row as one JSON line the moment it is measured (so a run cut off still reports what
it finished), each with the seconds it took, and starts no row that would end past ``--budget-s`` seconds from
the process's start, were it as long as the longest row so far (the rows it skips are named). Order: parity
without CUDA graphs, the regions at 8K tokens, parity with CUDA graphs, the regions at 1K tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from ..verify import relative_error as _rel  # max |a - b| / max |b|, NaN-aware


def _parity_models(device, small):
    from .models import build_llama
    from .nanogpt import NanoGPT

    llama = lambda: build_llama("llama-tiny", max_position_embeddings=4096).to(device)  # noqa: E731
    nano = lambda: NanoGPT(vocab=4096 if not small else 320, dim=64, layers=2).to(device)  # noqa: E731
    return {"llama-tiny": (llama, lambda m, ids: m(input_ids=ids, labels=ids).loss),
            "nanogpt": (nano, lambda m, ids: m(ids, ids.roll(-1, 1))[0])}  # next-token targets  # fmt: skip


def _step(model, loss_fn, ids, amp):
    with torch.autocast(ids.device.type, torch.bfloat16, enabled=amp):
        loss = loss_fn(model, ids)
    loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.detach().clone()
             for n, p in model.named_parameters() if p.grad is not None}  # fmt: skip
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _not_compiled() -> int:
    from ..report import counters

    return counters["bodies_not_compiled"]


def _process_age() -> float:
    """Seconds since this process started (its imports and CUDA's start count against the budget); 0 where
    ``/proc`` does not say."""
    import os

    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            return max(0.0, float(f.read().split()[0]) - started)
    except (OSError, ValueError, IndexError):
        return 0.0


class Rows(list):
    """The rows measured so far. ``add`` records one (with its seconds and how many compiled bodies fell back to
    op by op while it ran: a row with any is not ok) and, with ``echo``, prints it as one JSON line at once.
    ``over`` is true when the longest row so far would end past ``budget_s`` seconds from ``start`` (default:
    now), and names the row not started in ``skipped``: a row is not cut off, so the budget stops the check
    before it would run over."""

    def __init__(self, budget_s: float = float("inf"), echo: bool = False, start: float | None = None):
        super().__init__()
        self.start = time.perf_counter() if start is None else start
        self.last, self.longest = time.perf_counter(), 0.0
        self.budget_s, self.echo, self.skipped = budget_s, echo, []
        self.not_compiled = _not_compiled()

    def has_time(self) -> bool:
        return time.perf_counter() - self.start + self.longest < self.budget_s

    def over(self, check: str) -> bool:
        if self.has_time():
            return False
        self.skipped.append(check)
        return True

    def add(self, row: dict) -> None:
        now, not_compiled = time.perf_counter(), _not_compiled()
        # a body this torch's Inductor rejected runs op by op from then on (NOTE [compiled bodies]): the row
        # did not check, or time, the code it names
        fell_back = not_compiled - self.not_compiled
        row = {**row, "s": f"{now - self.last:.0f}", "bodies not compiled": fell_back,
               "ok": row["ok"] and not fell_back}  # fmt: skip
        self.longest = max(self.longest, now - self.last)
        self.last, self.not_compiled = now, not_compiled
        self.append(row)
        if self.echo:
            print(json.dumps(row), flush=True)


#: the kinds of compiled body that run the head's chunks: its cross-entropy, and a row-wise tail (softcap) with it
_HEAD_KINDS = ("cross_entropy", "tail", "pre", "post")
_PARITY_COUNTERS = ("mlp_rewritten", "head_rewritten", "bodies_compiled", "fallback_compile")


def _parity_row(device, tokens, build, loss_fn, precision, cudagraphs) -> dict:
    import copy

    from .. import _compat
    from ..ops import fresh_compiled_bodies, registry
    from ..report import counters

    torch.compiler.reset()
    model = build()
    fp64 = copy.deepcopy(model).double()
    if precision == "bf16-params":
        model = model.to(torch.bfloat16)
        fp64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    vocab = model.lm_head.weight.shape[0]
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    amp = precision == "autocast"
    ref_loss, ref = _step(fp64, loss_fn, ids, False)
    eager_loss, eager = _step(model, loss_fn, ids, amp)
    # NOTE [parity runs the chunks]: at these lengths the CUDA plan leaves every region whole, which would check
    # Inductor, not mst. The parity rows fix a chunk size with a ragged tail (3 chunks: 3/8, 3/8, 2/8 of the
    # tokens) and compile the chunk bodies on every device. A row is not ok unless both the MLP and the head were
    # chunked, each ran a compiled body (``registry.compiled_kinds``) and none fell back to op by op (``Rows.add``),
    # and the rewritten graph itself compiled (no plain-Inductor fallback).
    opts = {"chunk_tokens": tokens * 3 // 8, "compile_bodies": "always"}
    if cudagraphs:
        opts["inductor"] = {"triton.cudagraphs": True}
    before = {k: counters[k] for k in _PARITY_COUNTERS}
    skips = _compat.dynamo_counters["inductor"]["cudagraph_skips"]
    cm = torch.compile(model, backend="mst", options=opts)
    with fresh_compiled_bodies():  # each row compiles the bodies it runs (under CUDA graphs: in the warm-up)
        _step(cm, loss_fn, ids, amp)  # warm-up (cudagraphs records on a later call)
        loss, got = _step(cm, loss_fn, ids, amp)
        kinds = registry.compiled_kinds()
    mlp, head, compiled, plain = (counters[k] - before[k] for k in _PARITY_COUNTERS)
    skips = _compat.dynamo_counters["inductor"]["cudagraph_skips"] - skips  # Inductor ran without CUDA graphs
    compiled_mlp, compiled_head = kinds["mlp"], sum(kinds[k] for k in _HEAD_KINDS)
    err = {n: (_rel(got[n], ref[n]), _rel(eager[n], ref[n])) for n in ref}
    worst = max(err, key=lambda n: err[n][0] / max(err[n][1], 1e-3))
    loss_err = (_rel(loss, ref_loss), _rel(eager_loss, ref_loss))
    return {"loss dtype (mst/eager)": f"{loss.dtype}/{eager_loss.dtype}".replace("torch.", ""),
            "loss err vs fp64 (mst/eager)": f"{loss_err[0]:.1e}/{loss_err[1]:.1e}",
            "worst grad err vs fp64 (mst/eager)": f"{err[worst][0]:.1e}/{err[worst][1]:.1e} ({worst})",
            "chunked (mlp/head)": f"{mlp}/{head}", "bodies compiled (mlp/head)": f"{compiled_mlp}/{compiled_head}",
            **({"cudagraph skips": skips} if cudagraphs else {}),
            "ok": loss.dtype == eager_loss.dtype and loss_err[0] <= 1.25 * loss_err[1] + 1e-3
            and all(a <= 1.25 * e + 1e-2 for a, e in err.values())
            and mlp > 0 and head > 0 and compiled_mlp > 0 and compiled_head > 0 and compiled > 0 and not plain
            and not (cudagraphs and skips)}  # fmt: skip


PRECISIONS = ("bf16-params", "autocast")
#: with CUDA graphs, one precision per model (the graphs' code is the same; a short lease has no time for all)
CUDAGRAPHS_CASES = (("llama-tiny", "bf16-params"), ("nanogpt", "autocast"))


def parity_rows(device: str, small: bool, rows: Rows | None = None, cudagraphs: bool = False) -> Rows:
    """mst and eager, each against an fp64 run of the same weights: mst no further from it than eager; with
    ``cudagraphs``, the ``CUDAGRAPHS_CASES`` under CUDA graphs."""
    rows = Rows() if rows is None else rows
    tokens = 64 if small else 1024
    for name, (build, loss_fn) in _parity_models(device, small).items():
        for precision in PRECISIONS:
            if cudagraphs and (name, precision) not in CUDAGRAPHS_CASES:
                continue
            check = f"parity {name} {precision}" + (" cudagraphs" if cudagraphs else "")
            if rows.over(check):
                continue
            try:
                rows.add({"check": check, **_parity_row(device, tokens, build, loss_fn, precision, cudagraphs)})
            except Exception as e:  # noqa: BLE001  (one failing row must not cost the others)
                rows.add(_failed(check, e))
    return rows


def _failed(check: str, e: BaseException) -> dict:
    return {"check": check, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
            "ok": False}


class _MLP(torch.nn.Module):
    def __init__(self, h, i):
        super().__init__()
        self.gate, self.up, self.down = (torch.nn.Linear(h, i, bias=False), torch.nn.Linear(h, i, bias=False),
                                         torch.nn.Linear(i, h, bias=False))  # fmt: skip

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class _Head(torch.nn.Module):
    def __init__(self, h, v):
        super().__init__()
        self.proj = torch.nn.Linear(h, v, bias=False)

    def forward(self, x, y):
        return F.cross_entropy(self.proj(x).float().view(-1, self.proj.out_features), y.view(-1))


def _timed(fn, device, steps):
    times = []
    for _ in range(steps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _lengths(small: bool) -> tuple[int, int]:
    """The regions' token counts, long then short: 8K and 1K (512 and 256 with ``small``)."""
    return (512, 256) if small else (8192, 1024)


def region_rows(device: str, small: bool, steps: int = 5, lengths: tuple[int, ...] | None = None,
                rows: Rows | None = None) -> Rows:  # fmt: skip
    """Forward + backward time and memory of the MLP layer and the head at each of ``lengths`` tokens (8K and 1K;
    512 and 256 with ``small``) under each arm."""
    from ..ops import accumulate
    from ..report import counters

    h, i, v = (64, 224, 1000) if small else (4096, 14336, 128256)
    rows = Rows() if rows is None else rows
    for tokens in lengths or _lengths(small):
        g = torch.Generator(device).manual_seed(0)
        x = torch.randn(1, tokens, h, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
        y = torch.randint(0, v, (1, tokens), device=device, generator=g)
        for region, make, call in (("mlp", lambda: _MLP(h, i), lambda m: m(x).float().square().mean()),
                                   ("head", lambda: _Head(h, v), lambda m: m(x, y))):  # fmt: skip
            arms = {"torch.compile": ("inductor", True, None), "mst": ("mst", True, {})}
            # NOTE [fixed-chunk arms]: at these lengths the CUDA plan leaves the MLP whole (up to ~11K tokens on
            # 80 GB) and the head whole at 1K, so the variants run on fixed chunks, where they change what runs:
            # the MLP in 4, the head in 8 (8K: 1024 rows, the plan's CUDA_MIN_ROWS, beside the plan's own; 1K:
            # 128, what a chunk's fixed cost, the vocabulary-sized weight-gradient update, adds)
            n = 4 if region == "mlp" else 8
            fixed = {"chunk_tokens": tokens // n}
            arms[f"mst, {n} chunks"] = ("mst", True, fixed)
            arms[f"mst, {n} chunks, no fp32-out GEMM"] = ("mst", False, fixed)
            arms[f"mst, {n} chunks, bodies op by op"] = ("mst", True, {**fixed, "compile_bodies": "never"})
            if not rows.has_time():  # not even the weights made (V x H on the host takes seconds)
                rows.skipped += [f"{region} {tokens} tokens: {arm}" for arm in arms]
                continue
            with torch.device(device):
                module = make().to(torch.bfloat16)
            base_ms = None
            for arm, (backend, fp32_out, opts) in arms.items():
                check = f"{region} {tokens} tokens: {arm}"
                if rows.over(check):
                    continue
                accumulate.FP32_OUTPUT_GEMM = fp32_out
                torch.compiler.reset()
                before = counters[f"{region}_rewritten"]
                cm = torch.compile(module, backend=backend, **({"options": opts} if opts else {}))

                def step():
                    call(cm).backward()
                    module.zero_grad(set_to_none=True)
                    x.grad = None

                try:
                    step()  # compile
                    if device == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
                    ms = _timed(step, device, steps)
                except Exception as e:  # noqa: BLE001  (one arm failing must not cost the other rows)
                    rows.add(_failed(check, e))
                    continue
                finally:
                    accumulate.FP32_OUTPUT_GEMM = True
                alloc, reserved = ((torch.cuda.max_memory_allocated() - base[0]) / 2**20,
                                   (torch.cuda.max_memory_reserved() - base[1]) / 2**20) if device == "cuda" else (
                                      math.nan,) * 2  # fmt: skip
                base_ms = ms if backend == "inductor" else base_ms
                rows.add({"check": check, "chunked": "yes" if counters[f"{region}_rewritten"] - before else "no",
                          "fwd+bwd ms": f"{ms:.2f}", "vs torch.compile": f"{ms / base_ms:.2f}x" if base_ms else "",
                          "max alloc MiB": f"{alloc:.0f}", "max reserved MiB": f"{reserved:.0f}", "ok": True})
    return rows


def table(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[j]) for row in cells)) for j, c in enumerate(cols)]
    line = lambda vals: " | ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _setting(device: str) -> dict:
    """What the rows depend on besides the code: the fp32-output GEMM (without it each "no fp32-out GEMM" arm runs
    the same code as the fixed-chunk arm beside it), Triton's version, and the CUDA chunk plan's per-chunk
    budget."""
    from .. import plan
    from ..ops import accumulate

    out = {"fp32-output GEMM": accumulate.fp32_out_gemm_works(device, torch.bfloat16)}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if device == "cuda":
        out["chunk budget MiB"] = round(plan.cuda_budget() / 2**20)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mst_compile.bench gpu-check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="device to check on (default: cuda when available, else cpu)")  # fmt: skip
    ap.add_argument("--small", action="store_true", help="tiny shapes: a smoke test of the check itself")
    ap.add_argument("--skip-regions", action="store_true", help="parity rows only")
    ap.add_argument("--budget-s", type=float, default=float("inf"),
                    help="start no row that would end past this many seconds from the start, were it as long as "
                         "the longest so far (the skipped rows are named)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (use --device cpu --small for a smoke test)", file=sys.stderr)
        return 2
    from .. import _compat
    from ..backend import mst_backend

    _compat.register_backend_by_name("mst", mst_backend)  # a checkout that was not pip-installed
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"mst gpu-check on {name}, torch {torch.__version__}", flush=True)
    print(json.dumps({"setting": _setting(args.device)}), flush=True)
    rows = Rows(args.budget_s, echo=True, start=time.perf_counter() - _process_age())
    long, short = _lengths(args.small)
    parity_rows(args.device, args.small, rows)
    if not args.skip_regions:
        region_rows(args.device, args.small, lengths=(long,), rows=rows)
    if args.device == "cuda":
        parity_rows(args.device, args.small, rows, cudagraphs=True)
    if not args.skip_regions:
        region_rows(args.device, args.small, lengths=(short,), rows=rows)
    print(table([r for r in rows if r["check"].startswith("parity")]), flush=True)
    if not args.skip_regions:
        print(table([r for r in rows if not r["check"].startswith("parity")]), flush=True)
    print(f"{time.perf_counter() - rows.start:.0f} s in all")
    if rows.skipped:
        print(f"skipped after the {args.budget_s:.0f} s budget: {rows.skipped}")
    bad = [r["check"] for r in rows if not r["ok"]]
    print("all checks pass" if not bad else f"FAILED: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
