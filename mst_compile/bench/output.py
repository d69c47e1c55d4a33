"""The benchmark's outputs: ratios against ``torch.compile`` default, a table, CSV/JSON and a PNG plot."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys

from .deps import install_hint, optional

log = logging.getLogger("mst_compile.bench")

KEYS = ["form", "tokens", "arm", "peak_mib", "floor_mib", "peak_ratio", "step_s_median", "time_ratio", "compile_s",
        "loss"]  # fmt: skip


def add_ratios(rows: list[dict]) -> None:
    """``peak_ratio`` / ``time_ratio`` against the ``compile`` arm of the same form and length."""
    for r in rows:
        base = next((b for b in rows if b["arm"] == "compile" and b["form"] == r["form"] and b["tokens"] == r["tokens"]
                     and "peak_mib" in b), None)  # fmt: skip
        if base is not None and "peak_mib" in r:
            r["peak_ratio"] = r["peak_mib"] / base["peak_mib"]
            r["time_ratio"] = r["step_s_median"] / base["step_s_median"]


def table(rows: list[dict]) -> str:
    head = (f"{'form':<6} {'tokens':>6} {'arm':<22} {'peak MiB':>9} {'floor':>7} {'peak/floor':>10} "
            f"{'peak/compile':>12} {'time/compile':>12}  note")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        if "peak_mib" not in r:
            err = r.get("error") or ""
            why = err.splitlines()[-1][:60] if err else r.get("returncode")
            lines.append(f"{r['form']:<6} {r['tokens']:>6} {r['arm']:<22} {'-':>9} {'':>7} {'':>10} {'-':>12} {'-':>12}"
                         f"  FAILED: {why}")  # fmt: skip
            continue
        fl = r.get("floor_mib")
        pr = f"{r['peak_ratio']:.2f}x" if r.get("peak_ratio") is not None else "-"
        tr = f"{r['time_ratio']:.2f}x" if r.get("time_ratio") is not None else "-"
        pf = f"{r['peak_mib'] / fl:.2f}x" if fl else "-"
        note = f"{r['rewritten']} regions, {r.get('masks_rewritten', 0)} masks" if "rewritten" in r else ""
        lines.append(f"{r['form']:<6} {r['tokens']:>6} {r['arm']:<22} {r['peak_mib']:>9.0f} "
                     f"{(f'{fl:.0f}' if fl else '-'):>7} {pf:>10} {pr:>12} {tr:>12}  {note}")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> bool:
    """Peak MiB vs tokens, one panel per form, one line per arm (and mst's floor dashed). ``False`` without
    matplotlib."""
    matplotlib = optional("matplotlib")
    if matplotlib is None:
        log.warning("no plot: %s", install_hint("matplotlib"))
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "peak_mib" in r]
    forms = sorted({r["form"] for r in ok}, reverse=True)
    if not forms:
        return False
    fig, axes = plt.subplots(1, len(forms), figsize=(6.5 * len(forms), 4.5), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for ax, form in zip(axes[0], forms):
        ax.set_prop_cycle(color=colors)
        for arm in dict.fromkeys(r["arm"] for r in ok if r["form"] == form):
            pts = sorted((r["tokens"], r["peak_mib"]) for r in ok if r["form"] == form and r["arm"] == arm)
            ax.plot(*zip(*pts), marker="o", label=arm, lw=2.5 if arm.startswith("mst") else 1.2)
        fl = sorted((r["tokens"], r["floor_mib"]) for r in ok if r["form"] == form and r["arm"] == "mst" and
                    r.get("floor_mib"))  # fmt: skip
        if fl:
            ax.plot(*zip(*fl), ls="--", color="gray", label="analytic floor")
        ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="peak MiB of one step", title=f"{form} form")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
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
    w.writerows(r for r in rows if "peak_mib" in r)
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
