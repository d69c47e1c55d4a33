"""Post-grad pass: accumulate an embedding's gradient into the other gradient of the same weight.

NOTE [tied embedding gradient]: with tied embeddings (GPT-2, Gemma, Qwen2 small models) the weight ``W`` is
used twice, by the embedding and by the vocabulary projection, and its gradient is the sum of two ``V x H``
tensors. The backward graph Inductor receives builds the embedding's part on a fresh zero tensor, then adds::

    zeros = full([V, H], 0)
    g_emb = _unsafe_masked_index_put_accumulate(zeros, mask, [ids], rows)   # V x H, mostly zeros
    g_w   = add(g_head, g_emb)                                               # a third V x H buffer

so three ``V x H`` buffers can be alive at once (``g_head``, ``g_emb`` and the sum) where one is needed: 297 MiB
each at V = 151936, H = 512 in fp32. Scattering the rows straight into the other gradient is the same sum::

    g_w   = _unsafe_index_put(g_head, [clamp(ids)], where(mask, rows, 0), accumulate=True)

written as the masked op's own decomposition, because Inductor re-inplaces ``_unsafe_index_put`` (the scatter
then writes into ``g_head``'s buffer, which is a donated saved tensor when the head op made it) but not the
masked op. The row sums are added in another order, so results agree to rounding, not bit for bit. This pass
does not care where ``g_head`` comes from, only that the zero base is a ``full(0)`` used nowhere else and that
the other operand has exactly the sum's shape and dtype (no broadcasting).
"""

from __future__ import annotations

import logging

from torch import fx

from ...report import counters
from ..shared import val
from .base import InductorPass
from .ops import SCATTERS, aten

log = logging.getLogger("mst_compile")


def _zero_base(n) -> bool:
    return isinstance(n, fx.Node) and n.target is aten.full.default and n.args[1] == 0 and len(n.users) == 1


def _accumulating_scatter(n) -> bool:
    if not isinstance(n, fx.Node) or n.target not in SCATTERS or len(n.users) != 1:
        return False
    if n.target is aten.index_put.default:
        accumulate = n.args[3] if len(n.args) > 3 else n.kwargs.get("accumulate", False)
        if not accumulate:
            return False
    return _zero_base(n.args[0])


def _same(a, b) -> bool:
    va, vb = val(a), val(b)
    return va is not None and vb is not None and va.shape == vb.shape and va.dtype == vb.dtype


def _call(graph: fx.Graph, target, args: tuple) -> fx.Node:
    """A new node with its FakeTensor ``val`` (the later post-grad passes, re-inplacing among them, read it).
    ``args[0]`` is always a tensor node here."""
    n = graph.call_function(target, args)

    def vals(a):
        return [vals(x) for x in a] if isinstance(a, (list, tuple)) else (val(a) if isinstance(a, fx.Node) else a)

    with val(args[0]).fake_mode:
        n.meta["val"] = target(*vals(args))
    return n


def _scatter_into(graph: fx.Graph, other: fx.Node, scatter: fx.Node) -> fx.Node:
    """``scatter`` with ``other`` as its base, as a functional ``_unsafe_index_put`` / ``index_put`` that
    Inductor's re-inplacing turns into an in-place scatter into ``other``'s buffer (the masked variant is not
    in its list of inplaceable ops, so it is spelled out as its decomposition does: clamp, masked rows to 0;
    only ops Inductor lowers directly, as a post-grad graph is already decomposed)."""
    if scatter.target is aten.index_put.default:
        return _call(graph, aten.index_put.default, (other, scatter.args[1], scatter.args[2], True))
    _, mask, indices, values = scatter.args
    size = val(other).shape
    idx = [None if i is None else _call(graph, aten.clamp_max.default, (_call(graph, aten.clamp_min.default,
           (i, -size[d])), size[d] - 1)) for d, i in enumerate(indices)]  # fmt: skip
    masked = _call(graph, aten.where.ScalarOther, (mask, values, 0.0))
    return _call(graph, aten._unsafe_index_put.default, (other, idx, masked, True))


def accumulate_into_other_grad(graph: fx.Graph) -> int:
    """Rewrite every ``add(x, scatter_accumulate(zeros, ...))`` in ``graph`` into ``scatter_accumulate(x, ...)``;
    returns how many were rewritten."""
    done = 0
    for node in list(graph.nodes):
        if node.target is not aten.add.Tensor or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
            continue
        for i in (0, 1):
            scatter, other = node.args[i], node.args[1 - i]
            if not (_accumulating_scatter(scatter) and _same(other, node) and _same(scatter, node)):
                continue
            base = scatter.args[0]
            with graph.inserting_before(node):
                new = _scatter_into(graph, other, scatter)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            graph.erase_node(scatter)
            if not base.users:
                graph.erase_node(base)
            done += 1
            break
    if done:
        counters["embedding_grad_accumulated"] += done  # not bumped on an Inductor cache hit: the pass did not run
        log.debug("mst: %d embedding gradient(s) accumulated into the other gradient of their weight", done)
    return done


class EmbeddingGradPass(InductorPass):
    """The pass as Inductor's ``post_grad_custom_post_pass``."""

    what = "the tied-embedding gradient pass"

    def run(self, graph: fx.Graph) -> int:
        return accumulate_into_other_grad(graph)
