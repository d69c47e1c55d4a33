"""The contract of a Dynamo-graph pass: the context it reads and records into, and the typed failure that leaves
a region as it was."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from ...config import MSTConfig
from ...report import Region


class CantChunk(Exception):
    """A region cannot be rewritten; the message says why. Caught by the pass: the region stays as it was."""


def skip(rec: Region, e: Exception) -> None:
    """Record why a region is left alone. ``CantChunk`` is an expected outcome (logged with the report);
    any other exception is a bug in a pass, so it also warns (once per region), and the region stays as is."""
    if isinstance(e, CantChunk):
        rec.reason = str(e)
        return
    rec.reason = f"internal error in the {rec.kind} pass: {type(e).__name__}: {e}"
    warnings.warn(f"mst: {rec.kind} region at {rec.anchor} skipped: {rec.reason}", stacklevel=3)


@dataclass
class PassContext:
    config: MSTConfig
    grad_enabled: bool = True
    regions: list[Region] = field(default_factory=list)
    claimed: set = field(default_factory=set)  # nodes already part of a rewritten or rejected region
    # graph-output bridges for logits returned next to a fused loss (see logits.py)
    logits_outputs: list = field(default_factory=list)
    # False when nothing can wrap the compiled function's outputs (the Inductor-pass mode)
    allow_logits_output: bool = True
