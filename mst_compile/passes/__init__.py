"""The graph passes of the ``mst`` backend, grouped by the graph they read (``README.md`` here).

``dynamo/``: the passes on Dynamo's torch-level graph, before AOTAutograd, in the one order of ``PASSES``
below. Each has the signature ``rewrite(gm: fx.GraphModule, ctx: PassContext) -> None``: it finds its regions,
rewrites those it can, and records every candidate (rewritten or skipped, with the reason) in ``ctx.regions``.
A region that raises :class:`CantChunk` is left exactly as it was.

``aten/``: the passes on Inductor's aten graphs (joint, forward, backward), each an ``InductorPass`` the
backend installs in its Inductor custom-pass slot. ``shared.py``: what both read.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import os
import pkgutil
import sys

from torch import fx

from . import dynamo, shared
from .dynamo import causal_mask, head_ce, mlp, moe, normalize, row_writes, split_loss
from .dynamo.context import CantChunk, PassContext

log = logging.getLogger("mst_compile.passes")

#: ``(name, rewrite, also inside subgraphs)``. Normalization first (one spelling of a projection); the head
#: before the MLP: its projection widens too and must not be taken for an MLP.
PASSES = (
    ("normalize", normalize.rewrite, True),
    ("row_writes", row_writes.rewrite, True),  # NOTE [unrolled row writes]: one op for an unrolled mask loop
    ("split_loss", split_loss.rewrite, False),  # one cross-entropy for the head pass to find: root graph only
    ("causal_mask", causal_mask.rewrite, False),  # finds masks in the root graph, follows them into layers
    ("head_ce", head_ce.rewrite, False),  # its outputs are the model's outputs: root graph only
    ("moe", moe.rewrite, True),  # before the MLP pass: an expert or shared-expert MLP belongs to its block
    ("mlp", mlp.rewrite, True),
)


def dynamo_modules() -> list:
    """This module, the shared helpers and every module of ``dynamo/``: the source the Dynamo-graph rewrite
    depends on (the Inductor-pass mode's cache key)."""
    subs = sorted(m.name for m in pkgutil.iter_modules(dynamo.__path__))
    return [sys.modules[__name__], shared, dynamo, *(importlib.import_module(f"{dynamo.__name__}.{m}") for m in subs)]


# NOTE [Dynamo's graph metadata]: AOTAutograd reads which inputs of a graph are static (the parameters and
# buffers) from what Dynamo put on it: ``meta["dynamo_compile_id"]``, ``_param_name_to_source`` and each
# placeholder's ``_dynamo_source``. A copy made without them is taken for a graph from elsewhere, with no static
# input: CUDA graphs then copy every weight into their pool on each replay (a second copy of the model), and
# the weights they pass on are those copies, which need no gradient. So the copy carries them over.


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over copies of ``gm``'s graph and of its nested subgraphs (node metadata shared), so
    a rewrite that fails half-way leaves the original untouched; Dynamo's metadata goes with it (NOTE [Dynamo's
    graph metadata])."""
    g = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    g.output(g.graph_copy(gm.graph, copies))
    new = fx.GraphModule(gm, g)
    new.meta.update(gm.meta)
    for attr in ("_param_name_to_source", "_source_to_user_stacks", "_backend_id"):
        if hasattr(gm, attr):
            setattr(new, attr, getattr(gm, attr))
    for old, copy in copies.items():
        if old.op == "placeholder" and hasattr(old, "_dynamo_source"):
            copy._dynamo_source = old._dynamo_source
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


__all__ = ["PASSES", "CantChunk", "PassContext", "copy_graph_module", "dynamo_modules", "run_passes"]
