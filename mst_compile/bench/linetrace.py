"""Where in the compiled step the peak happens: resident memory after every line of Inductor's generated code.

    MALLOC_MMAP_THRESHOLD_=65536 python -m mst_compile.bench.linetrace --arm mst_ckpt --tokens 8192

Runs one arm's step (``worker.build_step``) twice to compile and warm up, then once more with a ``sys.settrace``
hook that records the process RSS after each line executed in an Inductor-generated module (its ``call``:
buffer allocations, kernel calls, ``del``s). With ``MALLOC_MMAP_THRESHOLD_`` set, freed large blocks go back to
the OS, so RSS follows the live buffers. Prints the line at the peak and the lines before it: which kernels
ran and which buffers were alive. How NOTE [second recompute], NOTE [horizontal fusion] and NOTE [checkpointed
region outputs] were found. CPU only (RSS); on a GPU use ``torch.cuda.memory._record_memory_history``.
"""

from __future__ import annotations

import os
import sys

from .cli import parser
from .worker import ARMS, build_step

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    """Resident bytes from ``statm`` (one short line: this runs after every traced line, where
    ``measure._status_kib``'s scan of ``/proc/self/status`` would slow the trace)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def trace_step(step) -> list[tuple[int, str, int]]:
    """``(RSS above the start, file, line)`` after each line run in Inductor-generated code during ``step()``."""
    base, rec = _rss(), []

    def tracer(frame, event, arg):
        if "torchinductor" not in frame.f_code.co_filename:
            return None
        if event in ("line", "return"):
            rec.append((_rss() - base, frame.f_code.co_filename, frame.f_lineno))
        return tracer

    sys.settrace(tracer)
    try:
        step()
    finally:
        sys.settrace(None)
    return rec


def report(rec: list[tuple[int, str, int]], context: int = 30) -> str:
    """The peak line and the ``context`` lines run before it, with the RSS after each."""
    if not rec:
        return "no line of Inductor-generated code ran"
    i = max(range(len(rec)), key=lambda k: rec[k][0])
    peak, path, line = rec[i]
    with open(path) as f:
        src = f.read().split("\n")
    out = [f"peak {peak / 2**20:.1f} MiB above the step's start at {path}:{line}"]
    for mib, p, ln in rec[max(0, i - context) : i + 4]:
        text = src[ln - 1].strip()[:140] if p == path else f"({os.path.basename(p)}:{ln})"
        out.append(f"{mib / 2**20:8.1f}  {ln:5d}  {text}")
    return "\n".join(out)


def main(argv=None) -> None:
    p = parser("python -m mst_compile.bench.linetrace", __doc__)
    p.add_argument("--arm", choices=ARMS, default="mst", help="the benchmark arm whose step is traced")
    p.add_argument("--model", default="llama-small", help="a model of bench/models.py, or zoo:ARCH")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per step (batch 1)")
    p.add_argument("--options", default="", help="mst options as JSON")
    p.add_argument("--context", type=int, default=30, help="generated-code lines printed before the peak")
    a = p.parse_args(argv)
    _, step = build_step(a.arm, "step", a.model, a.tokens, a.options)
    step()
    step()
    print(report(trace_step(step), a.context))


if __name__ == "__main__":
    main()
