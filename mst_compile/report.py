"""What the backend did: one record per candidate region, counters tests assert on, a readable report."""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field

log = logging.getLogger("mst_compile")

#: Process-wide counters, e.g. ``counters["mlp_rewritten"]``, ``counters["head_skipped"]``,
#: ``counters["graphs"]``, ``counters["fallback_compile"]``. Reset with :func:`reset_counters`.
counters: collections.Counter = collections.Counter()

_reports: list["Report"] = []


@dataclass
class Region:
    kind: str  # "mlp" | "head" | "mask"
    anchor: str  # the FX node that names the region (the expanding linear / the cross_entropy)
    status: str  # "rewritten" | "skipped"
    reason: str = ""
    chunks: str = ""  # "8" or "tokens/512"
    shapes: str = ""
    nodes: list[str] = field(default_factory=list)
    bytes_saved: int = 0  # estimated intermediate bytes no longer alive at once

    def line(self) -> str:
        what = f"{self.kind:<4} {self.anchor:<28} {self.status:<9}"
        if self.status == "rewritten" and self.kind == "mask":
            return f"{what} {self.shapes} ~{self.bytes_saved / 2**20:.1f} MiB saved"
        if self.status == "rewritten":
            return f"{what} chunks={self.chunks} {self.shapes} ~{self.bytes_saved / 2**20:.1f} MiB saved"
        return f"{what} {self.reason}"


@dataclass
class Report:
    """The regions found in one compiled graph."""

    graph: str
    regions: list[Region] = field(default_factory=list)
    fallback: str = ""  # non-empty: the rewritten graph failed to compile and plain Inductor was used

    def rewritten(self, kind: str | None = None) -> list[Region]:
        return [r for r in self.regions if r.status == "rewritten" and (kind is None or r.kind == kind)]

    def skipped(self, kind: str | None = None) -> list[Region]:
        return [r for r in self.regions if r.status == "skipped" and (kind is None or r.kind == kind)]

    def __str__(self) -> str:
        head = f"mst report for {self.graph}: {len(self.rewritten())} rewritten, {len(self.skipped())} skipped"
        if self.fallback:
            head += f" (FELL BACK to plain Inductor: {self.fallback})"
        return "\n".join([head] + ["  " + r.line() for r in self.regions])


def add_report(report: Report) -> None:
    _reports.append(report)
    counters["graphs"] += 1
    for r in report.regions:
        counters[f"{r.kind}_{r.status}"] += 1
    if report.fallback:
        counters["fallback_compile"] += 1
    log.info("%s", report)


def reports() -> list[Report]:
    """Every report of this process, oldest first."""
    return list(_reports)


def last_report() -> Report | None:
    return _reports[-1] if _reports else None


def reset_counters() -> None:
    counters.clear()
    _reports.clear()
