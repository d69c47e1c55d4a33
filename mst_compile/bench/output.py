"""The benchmark's outputs: ratios against ``torch.compile`` default, a table, CSV/JSON and a PNG plot."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import sys

from ..report import plural
from .deps import install_hint, optional

log = logging.getLogger("mst_compile.bench")

#: results.csv's columns (``estimate_mib``: the rows' ``floor_mib``, see ESTIMATE_NOTE; blank where not measured)
KEYS = ["form", "tokens", "arm", "peak_mib", "estimate_mib", "peak_ratio", "step_s_median", "time_ratio", "compile_s",
        "loss"]  # fmt: skip


def add_ratios(rows: list[dict]) -> None:
    """``peak_ratio`` / ``time_ratio`` against the ``compile`` arm of the same form and length."""
    for r in rows:
        base = next((b for b in rows if b["arm"] == "compile" and b["form"] == r["form"] and b["tokens"] == r["tokens"]
                     and "peak_mib" in b), None)  # fmt: skip
        if base is not None and "peak_mib" in r:
            r["peak_ratio"] = r["peak_mib"] / base["peak_mib"]
            r["time_ratio"] = r["step_s_median"] / base["step_s_median"]


#: the analytic estimate next to each peak (``floor.py``): a sum of terms that are not all alive at once, so a
#: measured peak can be below it (results files keep the key ``floor_mib``)
ESTIMATE_NOTE = ("estimate: analytic, gradients + activations that must be kept + one chunk's intermediate\n"
                 "(bench/floor.py); its terms are not all alive at once, so a peak can be below it")  # fmt: skip


def _number(value, fmt: str) -> str:
    """``value`` formatted, or a blank when it is missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return format(value, fmt)


def _note(r: dict) -> str:
    if "rewritten" not in r:
        return ""
    masks = r.get("masks_rewritten", 0)
    return "rewritten: " + plural(r["rewritten"], "region") + (f", {plural(masks, 'mask')}" if masks else "")


def table(rows: list[dict]) -> str:
    head = (f"{'form':<6} {'tokens':>6} {'arm':<22} {'peak MiB':>9} {'estimate':>8} {'peak/est.':>9} "
            f"{'peak/compile':>12} {'time/compile':>12}  note")  # fmt: skip
    lines = [head, "-" * len(head)]
    forms = list(dict.fromkeys(r["form"] for r in rows))
    for r in sorted(rows, key=lambda r: (forms.index(r["form"]), r["tokens"])):  # stable: run order within
        if "peak_mib" not in r:
            err = r.get("error") or ""
            why = err.splitlines()[-1][:60] if err else r.get("returncode")
            lines.append(f"{r['form']:<6} {r['tokens']:>6} {r['arm']:<22} {'':>9} {'':>8} {'':>9} {'':>12} {'':>12}"
                         f"  FAILED: {why}")  # fmt: skip
            continue
        est = r.get("floor_mib")
        pe = r["peak_mib"] / est if est else None
        lines.append(f"{r['form']:<6} {r['tokens']:>6} {r['arm']:<22} {_number(r['peak_mib'], '.0f'):>9} "
                     f"{_number(est, '.0f'):>8} {_number(pe, '.2f') + 'x' * (pe is not None):>9} "
                     f"{_x(r.get('peak_ratio')):>12} {_x(r.get('time_ratio')):>12}  {_note(r)}".rstrip())  # fmt: skip
    return "\n".join(lines + ["", ESTIMATE_NOTE])


def _x(ratio) -> str:
    text = _number(ratio, ".2f")
    return text + "x" if text else ""


MARKERS = "osD^vP*Xh<>pd"


def styles(arms) -> dict:
    """One colour and marker per arm, the same in every panel (``arms`` in order of first appearance)."""
    import matplotlib

    colors = matplotlib.colormaps["tab20"].colors
    colors = colors[::2] + colors[1::2]  # the ten strong colours first
    return {arm: (colors[i % len(colors)], MARKERS[i % len(MARKERS)]) for i, arm in enumerate(dict.fromkeys(arms))}


def _token_ticks(ax, tokens) -> None:
    """Powers of two across the measured lengths, as 2K, 4K, ... (no minor labels)."""
    from matplotlib.ticker import NullFormatter, NullLocator

    lo, hi = min(tokens), max(tokens)
    ticks = [2**k for k in range(max(0, lo.bit_length() - 1), hi.bit_length() + 1) if lo / 1.5 <= 2**k <= hi * 1.5]
    step = max(1, math.ceil(len(ticks) / 7))  # at most about seven labels per panel
    ticks = ticks[::step]
    ax.set_xticks(ticks, [f"{t // 1024}K" if t >= 1024 else str(t) for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def figure(rows: list[dict]):
    """The plot's figure: peak MiB vs tokens, one panel per form, one line per arm (same style in every panel),
    mst's analytic estimate dashed, one legend to the right of the panels. ``None`` without rows."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ok = [r for r in rows if "peak_mib" in r]
    forms = sorted({r["form"] for r in ok}, reverse=True)  # step, then model
    if not forms:
        return None
    style = styles(r["arm"] for r in ok)
    fig, axes = plt.subplots(1, len(forms), figsize=(5.2 * len(forms) + 2.6, 4.6), squeeze=False)
    handles = {}
    for ax, form in zip(axes[0], forms):
        mine = [r for r in ok if r["form"] == form]
        for arm in dict.fromkeys(r["arm"] for r in mine):
            pts = sorted((r["tokens"], r["peak_mib"]) for r in mine if r["arm"] == arm)
            color, marker = style[arm]
            (line,) = ax.plot(*zip(*pts), marker=marker, color=color, label=arm, ms=6,
                              lw=2.6 if arm.startswith("mst") else 1.3)  # fmt: skip
            handles.setdefault(arm, line)
        est = sorted((r["tokens"], r["floor_mib"]) for r in mine if r["arm"] == "mst" and r.get("floor_mib"))
        if est:
            (line,) = ax.plot(*zip(*est), ls="--", color="gray", label="mst: analytic estimate")
            handles.setdefault(line.get_label(), line)
        ax.set(xscale="log", yscale="log", xlabel="tokens (batch 1)", ylabel="peak MiB of one training step",
               title={"step": "step form (loss returned)", "model": "model form (logits returned too)"}.get(form, form))
        _token_ticks(ax, [r["tokens"] for r in mine])
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))  # 100, 200, 500, 1000, ...
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout(rect=(0, 0, 1 - 2.6 / fig.get_figwidth(), 1))
    fig.legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(1 - 2.5 / fig.get_figwidth(), 0.5),
               fontsize=8, frameon=False)  # fmt: skip
    return fig


def plot(rows: list[dict], path: str) -> bool:
    """Draw :func:`figure` into ``path``; ``False`` without matplotlib (one warning naming the extra) or rows."""
    matplotlib = optional("matplotlib")
    if matplotlib is None:
        log.warning("no plot: %s", install_hint("matplotlib"))
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = figure(rows)
    if fig is None:
        return False
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _atomic_write(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so a reader never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def save(rows: list[dict], out: str) -> str:
    """``results.json``, ``results.csv`` and ``table.txt`` of the rows so far (after each finished run);
    returns the table."""
    text = table(rows)
    _atomic_write(os.path.join(out, "results.json"), json.dumps(rows, indent=1))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=KEYS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        if "peak_mib" in r:
            r = {**r, "estimate_mib": r.get("floor_mib")}
            w.writerow({k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()})
    _atomic_write(os.path.join(out, "results.csv"), buf.getvalue())
    _atomic_write(os.path.join(out, "table.txt"), text + "\n")
    return text


def write(rows: list[dict], out: str) -> None:
    """Everything of a finished (or interrupted) run: the files of :func:`save`, the table on stdout, the plot."""
    print(save(rows, out))
    if plot(rows, os.path.join(out, "peak_vs_tokens.png")):
        print(f"plot: {os.path.join(out, 'peak_vs_tokens.png')}", file=sys.stderr)


def cap_table(rows: list[dict], cap: float) -> str:
    """The cap search's table: longest length per arm and form, and its ratio to compile's, eager's and the two
    checkpointing arms' (``>=``: the search reached ``--cap-max`` without going over the cap)."""
    refs = ("compile", "eager", "compile_ckpt", "hf_ckpt")
    lines = [f"longest sequence with a step peak <= {cap:.0f} MiB (lengths tried: {{tokens: peak MiB}})",
             f"{'form':<6} {'arm':<20} {'longest':>8} " + " ".join(f"{'x ' + b:>14}" for b in refs)
             + "  tried"]  # fmt: skip
    for r in rows:
        ref = {b["arm"]: b["longest"] for b in rows if b["form"] == r["form"]}
        bound = ">=" if r.get("first_over") is None else ""
        ratio = lambda arm: f"{bound}{r['longest'] / ref[arm]:.1f}x" if ref.get(arm) else "-"  # noqa: E731
        tried = ", ".join(f"{t}: {p:.0f}" if p is not None else f"{t}: failed" for t, p in r["tried"])
        lines.append(f"{r['form']:<6} {r['arm']:<20} {bound + str(r['longest']):>8} "
                     + " ".join(f"{ratio(b):>14}" for b in refs) + f"  {tried}")  # fmt: skip
    return "\n".join(lines)


def save_cap(rows: list[dict], out: str, cap: float) -> str:
    """``cap.json`` and ``cap.txt`` of the arms searched so far; returns the table."""
    text = cap_table(rows, cap)
    _atomic_write(os.path.join(out, "cap.json"), json.dumps(rows, indent=1))
    _atomic_write(os.path.join(out, "cap.txt"), text + "\n")
    return text


def write_cap(rows: list[dict], out: str, cap: float) -> None:
    print(save_cap(rows, out, cap))
