"""The graph passes of the ``mst`` backend, in the one order they run.

Each pass has the signature ``rewrite(gm: fx.GraphModule, ctx: PassContext) -> None``: it finds its regions,
rewrites those it can, and records every candidate (rewritten or skipped, with the reason) in ``ctx.regions``.
A region that raises :class:`CantChunk` is left exactly as it was.
"""

from __future__ import annotations

import logging

from torch import fx

from . import head_ce, mlp, normalize
from .common import CantChunk, PassContext

log = logging.getLogger("mst_compile.passes")

#: Normalization first (one spelling of a projection); the head before the MLP: its projection widens
#: too and must not be taken for an MLP.
PASSES = (
    ("normalize", normalize.rewrite),
    ("head_ce", head_ce.rewrite),
    ("mlp", mlp.rewrite),
)


def run_passes(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    for name, fn in PASSES:
        fn(gm, ctx)
        log.debug("after pass %s:\n%s", name, gm.graph)
    gm.graph.lint()
    gm.recompile()
    return gm


__all__ = ["PASSES", "CantChunk", "PassContext", "run_passes"]
