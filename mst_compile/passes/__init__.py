"""The graph passes of the ``mst`` backend, in the one order they run.

Each pass has the signature ``rewrite(gm: fx.GraphModule, ctx: PassContext) -> None``: it finds its regions,
rewrites those it can, and records every candidate (rewritten or skipped, with the reason) in ``ctx.regions``.
A region that raises :class:`CantChunk` is left exactly as it was.

One pass runs later, on Inductor's post-grad (aten, forward and backward) graph, as its
``post_grad_custom_post_pass``: ``embedding_grad`` (NOTE [tied embedding gradient]); the backend installs it.
"""

from __future__ import annotations

import itertools
import logging
import os

from torch import fx

from . import causal_mask, head_ce, mlp, moe, normalize
from .common import CantChunk, PassContext

log = logging.getLogger("mst_compile.passes")

#: ``(name, rewrite, also inside subgraphs)``. Normalization first (one spelling of a projection); the head before the MLP: its projection widens
#: too and must not be taken for an MLP.
PASSES = (
    ("normalize", normalize.rewrite, True),
    ("causal_mask", causal_mask.rewrite, False),  # finds masks in the root graph, follows them into layers
    ("head_ce", head_ce.rewrite, False),  # its outputs are the model's outputs: root graph only
    ("moe", moe.rewrite, True),  # before the MLP pass: an expert or shared-expert MLP belongs to its block
    ("mlp", mlp.rewrite, True),
)


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over copies of ``gm``'s graph and of its nested subgraphs (node metadata shared), so
    a rewrite that fails half-way leaves the original untouched."""
    g = fx.Graph()
    g.output(g.graph_copy(gm.graph, {}))
    new = fx.GraphModule(gm, g)
    for name, sub in gm.named_children():
        if isinstance(sub, fx.GraphModule):
            setattr(new, name, copy_graph_module(sub))
    return new


def _subgraphs(gm: fx.GraphModule) -> list[fx.GraphModule]:
    """Graphs nested in higher-order ops (activation checkpointing's ``tag_activation_checkpoint`` bodies)."""
    return [m for name, m in gm.named_modules() if name and isinstance(m, fx.GraphModule)]


_dump_count = itertools.count()


def _dumper(ctx: PassContext):
    """``dump(stage, *graphs)``: write the graphs' code to ``config.dump_dir`` (a no-op when it is unset)."""
    if not ctx.config.dump_dir:
        return lambda *a: None
    folder = ctx.config.dump_dir
    os.makedirs(folder, exist_ok=True)
    graph_id = next(_dump_count)

    def dump(stage, *graphs):
        with open(os.path.join(folder, f"graph{graph_id:03d}_{stage}.py"), "w") as f:
            for g in graphs:
                g.recompile()
                f.write(g.code + "\n")

    return dump


def run_passes(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """NOTE [checkpointed layers]: under ``gradient_checkpointing_enable()`` Dynamo puts each layer in a
    ``tag_activation_checkpoint`` subgraph. The MLP pass runs inside those bodies too: the chunked op is then
    recomputed by the checkpoint (forward chunk by chunk, no ``tokens x intermediate`` tensor) before its own
    chunked backward, which is the paper's MST + checkpointing configuration."""
    subs = _subgraphs(gm)
    dump = _dumper(ctx)
    dump("0_input", gm)
    for i, (name, fn, nested) in enumerate(PASSES, 1):
        for g in [gm] + (subs if nested else []):
            fn(g, ctx)
        log.debug("after pass %s:\n%s", name, gm.graph)
        dump(f"{i}_{name}", gm, *subs)
    for g in [gm] + subs:
        g.graph.lint()
        g.recompile()
    return gm


__all__ = ["PASSES", "CantChunk", "PassContext", "copy_graph_module", "run_passes"]
