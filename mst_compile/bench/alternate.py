"""Step time of two arms side by side in ONE process, their steps alternating: A B A B ...

    python -m mst_compile.bench alternate --tokens 1024
    python -m mst_compile.bench alternate --tokens 8192 --b-options '{"causal_mask": false}' --pairs 5

The benchmark's table times each arm in its own process, one after the other, with the memory measurement's
allocator setting (``MALLOC_MMAP_THRESHOLD_``); on a shared machine the speed drifts between those processes.
Here both arms are compiled in one process and their steps interleaved, so a drift hits both alike; the ratio
B/A is taken pair by pair and its median printed, with a 95% interval for that median (a seeded bootstrap over
the pairs: on a shared host two runs of the same pair can differ by more than a target's margin, so a target
counts as met only when the interval's upper end is under it), and with the allocator as the process found it
(run it with and without ``MALLOC_MMAP_THRESHOLD_=65536`` to see what the setting costs each arm).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time

from .cli import parser
from .worker import ARMS, FORMS, build_step


def _timed(step, device: str) -> float:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def median_interval(values, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A ``level`` interval for the median of ``values``: the percentile bootstrap, seeded so a rerun on the same
    numbers prints the same interval."""
    rng, n = random.Random(seed), len(values)
    meds = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(resamples))
    cut = (1 - level) / 2
    return meds[int(cut * resamples)], meds[min(resamples - 1, int((1 - cut) * resamples))]


def alternate(a_step, b_step, pairs: int, warmup: int, device: str = "cpu") -> dict:
    """Warm both steps up (the first call compiles), then time ``pairs`` pairs, the order flipped each pair."""
    for _ in range(warmup):
        a_step()
        b_step()
    ta, tb = [], []
    for i in range(pairs):
        order = [(a_step, ta), (b_step, tb)] if i % 2 == 0 else [(b_step, tb), (a_step, ta)]
        for step, out in order:
            out.append(_timed(step, device))
    ratios = [b / a for a, b in zip(ta, tb)]
    return {"a_s": ta, "b_s": tb, "a_median": statistics.median(ta), "b_median": statistics.median(tb),
            "ratio_median": statistics.median(ratios), "ratio_ci95": median_interval(ratios),
            "ratios": ratios}  # fmt: skip


def main(argv=None) -> int:
    p = parser("python -m mst_compile.bench alternate", __doc__)
    p.add_argument("--a", default="compile", choices=ARMS, help="arm A (the yardstick)")
    p.add_argument("--b", default="mst", choices=ARMS, help="arm B")
    p.add_argument("--b-options", default="", help="mst's options for arm B, as JSON")
    p.add_argument("--model", default="llama-small", help="a benchmark model name, zoo:<arch> or moe:<arch>[:<impl>] (bench/moe.py)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per step (batch 1)")
    p.add_argument("--form", choices=FORMS, default="step", help="step (the loss) or model (the logits too)")
    p.add_argument("--dtype", default="float32", help="parameter dtype")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--pairs", type=int, default=9, help="timed pairs of steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each arm first (the first compiles)")
    a = p.parse_args(argv)
    _, a_step = build_step(a.a, a.form, a.model, a.tokens, "", a.device, a.dtype)
    _, b_step = build_step(a.b, a.form, a.model, a.tokens, a.b_options, a.device, a.dtype)
    res = alternate(a_step, b_step, a.pairs, a.warmup, a.device)
    res.update(a=a.a, b=a.b, b_options=a.b_options, model=a.model, tokens=a.tokens, form=a.form, dtype=a.dtype,
               malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default"))  # fmt: skip
    print(json.dumps(res))
    lo, hi = res["ratio_ci95"]
    print(f"{a.b}{'[' + a.b_options + ']' if a.b_options else ''} / {a.a}: {res['ratio_median']:.3f}x (median of "
          f"{a.pairs} pairs, 95% interval {lo:.3f}-{hi:.3f}; medians {res['b_median']:.3f} s / "
          f"{res['a_median']:.3f} s), {a.tokens} tokens, {a.dtype}, "
          f"MALLOC_MMAP_THRESHOLD_={res['malloc_mmap_threshold']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
