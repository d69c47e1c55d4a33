"""Which aten ops the Inductor-graph passes treat how: the one classification they all read."""

from __future__ import annotations

import functools
import operator

import torch
from torch import fx

from ... import _compat

aten = torch.ops.aten

#: ops that only move or alias data (views, copies, concatenation): cheap to repeat
LAYOUT = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default, aten.transpose.int,
    aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.expand.default,
    aten.slice.Tensor, aten.select.int, aten.alias.default, aten.clone.default, aten.cat.default,
    aten.split.Tensor, aten.split_with_sizes.default,  # a fused q/k/v projection (GPT-2, GPT-NeoX), with getitem
}  # fmt: skip
GEMMS = {aten.mm.default, aten.addmm.default, aten.bmm.default}
ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu.default, aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default, aten._scaled_dot_product_cudnn_attention.default,
}  # fmt: skip
ATTENTION_BACKWARD = {
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
    aten._scaled_dot_product_flash_attention_backward.default, aten._scaled_dot_product_efficient_attention_backward.default,
    aten._scaled_dot_product_cudnn_attention_backward.default,
}  # fmt: skip
#: the accumulating scatters an embedding's backward builds its gradient with (NOTE [tied embedding gradient])
SCATTERS = (aten._unsafe_masked_index_put_accumulate.default, aten.index_put.default)


def cheap(n: fx.Node) -> bool:
    """A deterministic, functional layout or pointwise op (or an element of one): cheap to compute again."""
    t = n.target
    if t is operator.getitem:
        return isinstance(n.args[0], fx.Node) and cheap(n.args[0])
    if not isinstance(t, _compat.OpOverload) or torch.Tag.nondeterministic_seeded in t.tags or t._schema.is_mutable:
        return False  # random, or in place (``add_`` is tagged pointwise too): never repeated
    return t in LAYOUT or torch.Tag.pointwise in t.tags


def gemm_input(n: fx.Node) -> fx.Node | None:
    """The activation operand of a forward matmul (``addmm``'s is its second argument)."""
    a = n.args[1] if n.target is aten.addmm.default else n.args[0]
    return a if isinstance(a, fx.Node) else None


def is_mst_op(n: fx.Node) -> bool:
    """A call of one of mst's chunked ops (``torch.ops.mst.*``)."""
    return getattr(n.target, "namespace", None) == "mst"


def is_big_backward_op(n: fx.Node) -> bool:
    """An op around which a backward's peak sits: the attention backward, mst's chunk loops."""
    return n.op == "call_function" and (n.target in ATTENTION_BACKWARD or is_mst_op(n))


def is_view(n: fx.Node) -> bool:
    """An op whose result aliases its input's storage."""
    t = n.target
    return isinstance(t, _compat.OpOverload) and _returns_view(t)


@functools.lru_cache(maxsize=None)
def _returns_view(t) -> bool:
    rets = t._schema.returns
    return bool(rets) and rets[0].alias_info is not None and not rets[0].alias_info.is_write
