"""Every GEMM of one compiled training step, from the profiler: shapes, operand layouts, dtype, seconds.

    python -m mst_compile.bench gemms --arm mst --tokens 1024 --dtype bfloat16
    python -m mst_compile.bench gemms --arm compile --tokens 1024 --dtype bfloat16

A GEMM's layout is two letters, one per operand: ``N`` when its rows are contiguous, ``T`` when it is a
transposed view (its columns are). On a CPU without bf16 instructions torch's bf16 GEMM falls back to a kernel
whose speed depends on the layout by an order of magnitude (``NN`` the slow one), so a bf16 step time there counts
which GEMMs run ``NN`` more than anything the arms do differently; this table shows which they are and how much
of the step they take. The step is run once untimed (it compiles) and once under the profiler.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
import time

from .cli import parser
from .worker import ARMS, build_step

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_")


def layout(strides) -> str:
    """``N`` (rows contiguous), ``T`` (columns contiguous) or ``?`` for a 2-D operand's strides."""
    if strides and strides[-1] == 1:
        return "N"
    return "T" if strides and strides[0] == 1 else "?"


def gemm_rows(trace_events) -> list[dict]:
    """The GEMMs of a Chrome trace (``record_shapes=True``), grouped by op, shapes, layouts and dtype, the most
    time first."""
    rows = collections.defaultdict(lambda: [0, 0.0])
    for e in trace_events:
        if e.get("name") not in GEMM_OPS:
            continue
        args = e["args"]
        dims, strides, types = args["Input Dims"], args["Input Strides"], args["Input type"]
        i = 0 if e["name"] == "aten::mm" else 1  # addmm's first input is what is added
        key = (e["name"][6:], tuple(dims[i]), tuple(dims[i + 1]), layout(strides[i]) + layout(strides[i + 1]),
               types[i])  # fmt: skip
        rows[key][0] += 1
        rows[key][1] += e["dur"] / 1e6
    out = [{"op": k[0], "a": k[1], "b": k[2], "layout": k[3], "dtype": k[4], "calls": n, "seconds": s}
           for k, (n, s) in rows.items()]  # fmt: skip
    return sorted(out, key=lambda r: -r["seconds"])


def profile_step(step) -> tuple[float, list[dict]]:
    """One step under the profiler: (its seconds, its GEMM rows)."""
    from torch.profiler import ProfilerActivity, profile

    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    seconds = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    return seconds, gemm_rows(events)


def main(argv=None) -> int:
    p = parser("python -m mst_compile.bench gemms", __doc__)
    p.add_argument("--arm", default="mst", choices=ARMS, help="what compiles the step")
    p.add_argument("--options", default="", help="mst's options, as JSON")
    p.add_argument("--model", default="llama-small", help="a benchmark model name (bench/models.py) or zoo:<arch>")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per step (batch 1)")
    p.add_argument("--dtype", default="float32", help="parameter dtype")
    a = p.parse_args(argv)
    _, step = build_step(a.arm, "step", a.model, a.tokens, a.options, "cpu", a.dtype)
    step()
    seconds, rows = profile_step(step)
    total = sum(r["seconds"] for r in rows)
    nn = sum(r["seconds"] for r in rows if r["layout"] == "NN")
    print(json.dumps({"arm": a.arm, "options": a.options, "model": a.model, "tokens": a.tokens, "dtype": a.dtype,
                      "step_s": seconds, "gemm_s": total, "nn_gemm_s": nn, "gemms": rows}))  # fmt: skip
    print(f"{a.arm} {a.tokens} tokens {a.dtype}: step {seconds:.2f} s (profiled), GEMMs {total:.2f} s, of which NN "
          f"{nn:.2f} s")  # fmt: skip
    for r in rows:
        print(f"{r['seconds']:9.3f} s {r['calls']:4d}x {r['op']:7s} {str(r['a']):14s} @ {str(r['b']):14s} "
              f"{r['layout']} {r['dtype']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
