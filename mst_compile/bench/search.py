"""The longest sequence that trains under a fixed peak-memory cap, per arm: measured, not extrapolated.

Lengths double from ``--cap-start`` until a step's peak exceeds the cap (or the run fails), then two bisection
steps between the last length that fit and the first that did not (resolution: a quarter of that interval,
rounded to 256 tokens, or to a quarter of ``--cap-start`` when that is smaller). Each length is one worker
process, like every other measurement of the benchmark.
"""

from __future__ import annotations

import sys

ROUND = 256


def _fits(r: dict, cap: float) -> bool:
    return "peak_mib" in r and r["peak_mib"] <= cap


def longest_under_cap(arms, forms, a, measure, rows: list | None = None, on_row=None) -> list[dict]:
    """One row per form and arm, appended to ``rows`` (returned) as each arm's search ends; ``on_row()`` after
    each (the benchmark saves the rows so far)."""
    rows = [] if rows is None else rows
    for form in forms:
        for arm in arms:
            tried, lo, hi, n = [], 0, None, a.cap_start
            while n <= a.cap_max:
                r = measure(arm, form, n, a)
                tried.append((n, r.get("peak_mib")))
                print(f"[cap] {form} {arm} {n}: {r.get('peak_mib', 'failed')}", file=sys.stderr, flush=True)
                if not _fits(r, a.cap_mib):
                    hi = n
                    break
                lo, n = n, n * 2
            step = max(16, min(ROUND, a.cap_start // 4))
            for _ in range(2 if hi is not None and lo else 0):
                mid = (lo + hi) // 2 // step * step
                if mid in (lo, hi):
                    break
                r = measure(arm, form, mid, a)
                tried.append((mid, r.get("peak_mib")))
                print(f"[cap] {form} {arm} {mid}: {r.get('peak_mib', 'failed')}", file=sys.stderr, flush=True)
                lo, hi = (mid, hi) if _fits(r, a.cap_mib) else (lo, mid)
            rows.append(dict(form=form, arm=arm, longest=lo, first_over=hi, tried=tried))
            if on_row is not None:
                on_row()
    return rows
