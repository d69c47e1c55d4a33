"""The head that ``head_ce`` rewrites, matched without touching the graph.

``cross_entropy(T(linear(h, W, b)), labels)`` where ``T`` is any chain of row-wise elementwise math taking no
tensor besides the logits (``.float()`` upcast, scaling, tanh softcap) mixed with layout ops that only touch
token dimensions (``view(-1, V)``, ``flatten``, shift slices such as ``[..., :-1, :]``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from ... import _compat
from ..shared import tval
from .context import CantChunk, PassContext
from .nodes import bind_cross_entropy, is_elementwise, linear_args


def layout_kind(n: fx.Node) -> str | None:
    if n.op == "call_method" and n.target in ("view", "reshape"):
        return "view"
    if (n.op == "call_method" and n.target == "flatten") or (n.op == "call_function" and n.target is torch.flatten):
        return "flatten"
    if n.op == "call_method" and n.target == "contiguous":
        return "contiguous"
    if n.op == "call_function" and n.target is operator.getitem:
        return "getitem"
    return None


def view_shape(n: fx.Node) -> list:
    shape = list(n.args[1:])
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = list(shape[0])
    return shape


def _check_layout(n: fx.Node, kind: str, vocab: int) -> None:
    """Layout ops may regroup or select token dimensions only; the vocab dimension stays last and whole."""
    v_in, v_out = tval(n.args[0]), tval(n)
    if v_in is None or v_out is None or v_out.dim() == 0 or v_out.shape[-1] != vocab:
        raise CantChunk(f"{n.name} changes the vocabulary dimension")
    if kind == "view" and view_shape(n)[-1] not in (vocab, -1):
        raise CantChunk(f"{n.name} reshapes the vocabulary dimension")
    if kind == "flatten":
        end = n.kwargs.get("end_dim", n.args[2] if len(n.args) > 2 else -1)
        if end in (-1, v_in.dim() - 1):
            raise CantChunk(f"{n.name} flattens the vocabulary dimension")
    if kind == "getitem":
        idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
        if any(i is None or isinstance(i, (fx.Node, torch.Tensor)) for i in idx):
            raise CantChunk(f"{n.name} indexes logits with tensors or adds dimensions")
        touches_last = (Ellipsis in idx and idx[-1] is not Ellipsis) or (Ellipsis not in idx and len(idx) >= v_in.dim())
        if touches_last and idx[-1] != slice(None, None, None):
            raise CantChunk(f"{n.name} slices the vocabulary dimension")


def _is_tail_op(n: fx.Node) -> bool:
    """Row-wise elementwise op whose only tensor input is the logits."""
    return is_elementwise(n) and len(n.all_input_nodes) == 1


@dataclass
class HeadMatch:
    ce: fx.Node
    lin: fx.Node
    chain: list  # forward order, after lin
    exposed: fx.Node | None
    args: dict


def find_head(ce: fx.Node, ctx: PassContext) -> HeadMatch:
    args = bind_cross_entropy(ce)
    if args["weight"] is not None:
        raise CantChunk("cross_entropy with class weights")
    if args["size_average"] is not None or args["reduce"] is not None:
        raise CantChunk("cross_entropy with legacy size_average/reduce")
    if args["reduction"] not in ("mean", "sum"):
        raise CantChunk(f"cross_entropy reduction {args['reduction']!r} (only 'mean' and 'sum' are fused)")
    if not isinstance(args["ignore_index"], int) or not isinstance(args["label_smoothing"], (int, float)):
        raise CantChunk("cross_entropy ignore_index/label_smoothing are not constants")
    inp = args["input"]
    iv = tval(inp)
    if iv is None or iv.dim() != 2:
        raise CantChunk("cross_entropy input is not [tokens, vocab]")
    vocab = iv.shape[-1]
    _check_target(args["target"], iv)
    chain, cur = [], inp
    while linear_args(cur) is None:
        if not isinstance(cur, fx.Node) or cur in ctx.claimed:
            raise CantChunk("no vocabulary projection feeds the loss")
        kind = layout_kind(cur)
        if kind is not None:
            _check_layout(cur, kind, vocab)
        elif not _is_tail_op(cur):
            raise CantChunk(f"{cur.name} ({cur.target}) between the projection and the loss is not row-wise")
        chain.append(cur)
        cur = cur.args[0]
    lin = cur
    chain.reverse()
    h, w, b = linear_args(lin)
    if not isinstance(w, fx.Node) or tval(w) is None or tval(w).dim() != 2:
        raise CantChunk(f"{lin.name} has no weight matrix")
    if b is not None and not isinstance(b, fx.Node):
        raise CantChunk(f"{lin.name} has a non-tensor bias")
    members = set([lin] + chain)
    exposed = None
    for n in [lin] + chain:
        outside = [u for u in n.users if u not in members and u is not ce]
        if not outside:
            continue
        if any(u.op != "output" for u in outside):
            raise CantChunk(f"{n.name} is also used by {outside[0].name} inside the graph")
        if exposed is not None:
            raise CantChunk("more than one value of the head is returned")
        exposed = n
    if exposed is not None:
        before = [lin] + chain[: chain.index(exposed) + 1 if exposed in chain else 0]
        if any(layout_kind(n) not in (None, "contiguous") for n in before):
            raise CantChunk("the returned logits are a reshaped or sliced view of the projection")
    return HeadMatch(ce, lin, chain, exposed, args)


#: label dtypes the fused op takes. int64 is eager's; int32 is what Inductor accepts too (its decomposition
#: gathers with it), and the op reads it as int64, the value eager gives for the same labels as int64.
LABEL_DTYPES = (torch.int64, torch.int32)


def _check_target(target, iv) -> None:
    """NOTE [guarded head]: the fused op computes class-index cross-entropy over ``[tokens]`` labels. Anything
    else (class probabilities, float or other integer targets, another shape) is left to the original op, so
    its result or its error is exactly what the compiler gives without mst."""
    tv = tval(target)
    if tv is None:
        raise CantChunk("the cross_entropy target is not a tensor")
    if tv.is_floating_point() or tv.is_complex():
        raise CantChunk(f"cross_entropy with {tv.dtype} targets (class probabilities) is not fused")
    if tv.dtype not in LABEL_DTYPES:
        raise CantChunk(f"cross_entropy with {tv.dtype} labels is not fused (only {', '.join(map(str, LABEL_DTYPES))})")
    if tv.dim() != 1 or _compat.sym_expr(tv.shape[0]) != _compat.sym_expr(iv.shape[0]):
        raise CantChunk(f"cross_entropy target of shape {list(tv.shape)} for input {list(iv.shape)}")


def check_tail_inputs(chain: list[fx.Node], lin: fx.Node) -> None:
    for n in chain:
        if layout_kind(n) is None and n.all_input_nodes != [n.args[0]]:
            raise CantChunk(f"{n.name} mixes the logits with another tensor")
