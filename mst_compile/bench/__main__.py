"""Side-by-side benchmark: every arm in its own process, same model and tokens.

    python -m mst_compile.bench                                  # default model, 2048 tokens, both forms
    python -m mst_compile.bench --tokens 2048,4096,8192,16384 --out bench_out

Prints a table of peak MiB of one step, the peak ratio and the median step-time ratio against
``torch.compile`` default (the strongest baseline), and writes ``results.json`` / ``results.csv``.
Forms: ``step`` compiles a function returning only the loss; ``model`` compiles the model itself, which
returns the logits too (the one-line use).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from .measure import run_worker
from .worker import ARMS, EXTRA_ARMS, FORMS


def _fmt_table(rows: list[dict]) -> str:
    lines = []
    head = f"{'form':<6} {'tokens':>6} {'arm':<13} {'peak MiB':>9} {'peak/compile':>12} {'time/compile':>12}  note"
    lines.append(head)
    lines.append("-" * len(head))
    for r in rows:
        if "error" in r:
            lines.append(f"{r['form']:<6} {r['tokens']:>6} {r['arm']:<13} {'-':>9} {'-':>12} {'-':>12}  FAILED: "
                         f"{r['error'].splitlines()[-1][:60] if r['error'] else r.get('returncode')}")  # fmt: skip
            continue
        pr = f"{r['peak_ratio']:.2f}x" if r.get("peak_ratio") is not None else "-"
        tr = f"{r['time_ratio']:.2f}x" if r.get("time_ratio") is not None else "-"
        note = f"{r['rewritten']} regions" if "rewritten" in r else ""
        lines.append(f"{r['form']:<6} {r['tokens']:>6} {r['arm']:<13} {r['peak_mib']:>9.0f} {pr:>12} {tr:>12}  {note}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mst_compile.bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-small")
    p.add_argument("--tokens", default="2048", help="comma-separated token counts (batch 1)")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--forms", default=",".join(FORMS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="bench_out")
    a = p.parse_args(argv)
    arms, forms = a.arms.split(","), a.forms.split(",")
    for arm in arms:
        if arm not in ARMS + EXTRA_ARMS:
            p.error(f"unknown arm {arm!r}; arms: {ARMS + EXTRA_ARMS}")
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for form in forms:
        for tokens in [int(t) for t in a.tokens.split(",")]:
            group = []
            for arm in arms:
                args = ["--arm", arm, "--form", form, "--tokens", str(tokens), "--model", a.model,
                        "--steps", str(a.steps), "--dtype", a.dtype] + (["--device", a.device] if a.device else [])  # fmt: skip
                r = run_worker(args)
                r.update(arm=arm, form=form, tokens=tokens)
                group.append(r)
                print(f"[bench] {form} {tokens} {arm}: " + (f"{r['peak_mib']:.0f} MiB, {r['step_s_median']:.2f} s"
                      if "peak_mib" in r else "failed"), file=sys.stderr, flush=True)  # fmt: skip
            base = next((r for r in group if r["arm"] == "compile" and "peak_mib" in r), None)
            for r in group:
                if base is not None and "peak_mib" in r:
                    r["peak_ratio"] = r["peak_mib"] / base["peak_mib"]
                    r["time_ratio"] = r["step_s_median"] / base["step_s_median"]
            rows += group
    table = _fmt_table(rows)
    print(table)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    keys = ["form", "tokens", "arm", "peak_mib", "peak_ratio", "step_s_median", "time_ratio", "compile_s", "loss"]
    with open(os.path.join(a.out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(r for r in rows if "peak_mib" in r)
    with open(os.path.join(a.out, "table.txt"), "w") as f:
        f.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
