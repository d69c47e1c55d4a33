"""What the backend did: one record per candidate region, counters tests assert on, a readable report."""

from __future__ import annotations

import collections
import logging
import weakref
import re
from dataclasses import dataclass, field

log = logging.getLogger("mst_compile")

#: Process-wide counters, e.g. ``counters["mlp_rewritten"]``, ``counters["head_skipped"]``,
#: ``counters["graphs"]``, ``counters["fallback_compile"]``. Reset with :func:`reset_counters`.
counters: collections.Counter = collections.Counter()

_reports: list["Report"] = []


@dataclass
class Region:
    kind: str  # "mlp" | "head" | "mask" | "moe" | "rows"
    anchor: str  # the FX node that names the region (the expanding linear / the cross_entropy)
    status: str  # "rewritten" | "skipped"
    reason: str = ""
    chunks: str = ""  # "8" or "tokens/512"
    shapes: str = ""
    nodes: list[str] = field(default_factory=list)
    bytes_saved: int = 0  # estimated intermediate bytes no longer alive at once

    def line(self) -> str:
        what = f"{self.kind:<4} {self.anchor:<28} {self.status:<9}"
        if self.status != "rewritten":
            return f"{what} {self.reason}"
        parts = [readable_shapes(self.shapes)]
        if self.kind != "mask":
            parts.insert(0, chunk_words(self.chunks))
        parts.append(f"est. {self.bytes_saved / 2**20:.1f} MiB saved")
        return f"{what} " + ", ".join(p for p in parts if p)


def plural(n: int, word: str) -> str:
    """``1 region``, ``2 regions``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def chunk_words(label: str) -> str:
    """A region's chunk label (``"8"``, or the rule when the token count is symbolic) in words."""
    if not label:
        return ""
    return plural(int(label), "chunk") if label.isdigit() else f"chunks: {label}"


#: the head pass's names for what happens to logits returned next to the loss (``logits.py``), in words
_LOGITS_WORDS = {
    "logits=bridge": "logits returned (differentiable)",
    "logits=plain": "logits returned (no gradient needed)",
    "logits=skip": 'logits not materialized (logits="skip")',
    "logits=not returned": "logits not returned",
}


def readable_shapes(shapes: str) -> str:
    """The passes' shape notes as the report prints them: mode names in words, ``1 attention call``."""
    for key, words in _LOGITS_WORDS.items():
        shapes = shapes.replace(key, words)
    return re.sub(r"\b1 attention calls\b", "1 attention call", shapes)


@dataclass
class Report:
    """The regions found in one compiled graph."""

    graph: str  # what the graph is, e.g. "195 nodes"
    regions: list[Region] = field(default_factory=list)
    fallback: str = ""  # non-empty: the rewritten graph failed to compile and plain Inductor was used
    index: int | None = None  # the graph's number in this process (1 for the first), set by add_report
    verify: list = field(default_factory=list)  # the first call's checks, when verify is on (NOTE [verify])
    # weak references to the parameters the graph reads (Dynamo passes them as graph inputs), to tell which
    # model a report belongs to without keeping the model alive
    params: list = field(default_factory=list, repr=False)

    def parameters(self) -> list:
        return [p for p in (ref() for ref in self.params) if p is not None]

    def note_parameters(self, example_inputs) -> None:
        import torch

        self.params = [weakref.ref(t) for t in example_inputs if isinstance(t, torch.nn.Parameter)]

    def rewritten(self, kind: str | None = None) -> list[Region]:
        return [r for r in self.regions if r.status == "rewritten" and (kind is None or r.kind == kind)]

    def chunked(self) -> list[Region]:
        """The rewritten regions that run in chunks (all but the causal mask): NOTE [untouched graphs]."""
        return [r for r in self.rewritten() if r.kind != "mask"]

    def skipped(self, kind: str | None = None) -> list[Region]:
        return [r for r in self.regions if r.status == "skipped" and (kind is None or r.kind == kind)]

    def __str__(self) -> str:
        name = "graph" if self.index is None else f"graph {self.index}"
        head = f"mst: {name} ({self.graph}): {plural(len(self.rewritten()), 'region')} rewritten, " \
               f"{len(self.skipped())} skipped"  # fmt: skip
        if self.fallback:
            head += f" (FELL BACK to plain Inductor: {self.fallback})"
        return "\n".join([head] + ["  " + r.line() for r in self.regions])


def add_report(report: Report) -> None:
    _reports.append(report)
    counters["graphs"] += 1
    if report.index is None:
        report.index = counters["graphs"]
    for r in report.regions:
        counters[f"{r.kind}_{r.status}"] += 1
    if report.fallback:
        counters["fallback_compile"] += 1
    log.info("%s", report)


def reports(model=None) -> list[Report]:
    """Every report of this process, oldest first; with ``model`` (a module, or the compiled module), only
    those of graphs that read its parameters: what ``torch.compile(model, backend="mst")`` did to that model,
    whatever else was compiled in the process."""
    if model is None:
        return list(_reports)
    mine = {id(p) for p in model.parameters()}
    return [r for r in _reports if any(id(p) in mine for p in r.parameters())]


def last_report(model=None) -> Report | None:
    """The newest report (of ``model``'s graphs when given, see :func:`reports`)."""
    found = reports(model)
    return found[-1] if found else None


def reset_counters() -> None:
    counters.clear()
    _reports.clear()
