"""Pass: rewrite projections spelled other ways into ``linear``, and comparisons spelled as methods into
``operator`` functions, so the later passes see one form.

Before::  m = x.__eq__(y)                       (how torch 2.11's Dynamo records ``x == y`` on a tensor)
After::   m = operator.eq(x, y)                 (how later torch records it; ``!=``, ``<``, ... the same)

Before::  t = torch.addmm(b, x2d, W)            (GPT-2 ``Conv1D``; W is [in, out])
After::   t = torch._C._nn.linear(x2d, W.t(), b)

Only ``beta == alpha == 1`` is rewritten; the value is identical (``b + x @ W``). Projections written as a
product with a weight matrix are rewritten the same way (the value is ``x @ W`` either way)::

    x @ W,  torch.matmul(x, W)                  ->  linear(x, W.t())     (W: [in, out], x: [..., in])
    torch.einsum("btd,df->btf", x, W)           ->  linear(x, W.t())
    torch.einsum("...d,fd->...f", x, W)         ->  linear(x, W)         (W: [out, in], as nn.Linear keeps it)

Then the token flattening around such a projection is folded away, so the projection reads the unflattened
input:

Before::  t = linear(x.view(-1, H), Wt, b).view(*x.shape[:-1], out)
After::   t = linear(x, Wt, b)
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ... import _compat
from ..shared import tval
from .context import PassContext
from .nodes import linear_args


#: a tensor's comparison methods, as the ``operator`` functions the later passes match
_COMPARE_METHODS = {"__eq__": operator.eq, "__ne__": operator.ne, "__lt__": operator.lt, "__le__": operator.le,
                    "__gt__": operator.gt, "__ge__": operator.ge}  # fmt: skip


def rewrite(gm: fx.GraphModule, ctx: PassContext) -> None:
    g = gm.graph
    for n in list(g.nodes):
        if n.op == "call_method" and n.target in _COMPARE_METHODS and len(n.args) == 2 and not n.kwargs:
            _replace(g, n, _COMPARE_METHODS[n.target], n.args)
    for n in list(g.nodes):
        if n.op != "call_function" or n.target is not torch.addmm or len(n.args) != 3:
            continue
        if n.kwargs.get("beta", 1) != 1 or n.kwargs.get("alpha", 1) != 1:
            continue
        bias, x, w = n.args
        wv = tval(w)
        if wv is None or wv.dim() != 2 or not isinstance(x, fx.Node):
            continue
        with g.inserting_before(n):
            wt = g.call_method("t", (w,))
            wt.meta["example_value"] = wv.t()
        _replace(g, n, _compat.LINEAR, (x, wt, bias))
    for n in list(g.nodes):
        proj = _matmul_projection(n)
        if proj is not None:
            _to_linear(g, n, *proj)
    _fold_token_flattening(g)


_MATMULS = (operator.matmul, torch.matmul)


def _matmul_projection(n: fx.Node) -> tuple[fx.Node, fx.Node, bool] | None:
    """``(x, W, transposed)`` when ``n`` is ``x @ W`` or a two-operand einsum contracting ``x``'s last dimension
    with a matrix ``W`` and keeping the rest of ``x`` in order: ``linear(x, W.t() if transposed else W)``."""
    if n.op != "call_function" or n.kwargs:
        return None
    if n.target in _MATMULS and len(n.args) == 2:
        x, w = n.args
        return (x, w, True) if _operands_fit(x, w) else None
    if n.target is not torch.einsum or not n.args or not isinstance(n.args[0], str):
        return None
    ops = list(n.args[1]) if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) else list(n.args[1:])
    spec = n.args[0].replace(" ", "")
    if len(ops) != 2 or spec.count("->") != 1:
        return None
    ins, out = spec.split("->")
    subs = ins.split(",")
    if len(subs) != 2:
        return None
    for xi, wi in ((0, 1), (1, 0)):
        x, w, xs, ws = ops[xi], ops[wi], subs[xi], subs[wi]
        if not _operands_fit(x, w) or len(ws) != 2 or len(set(ws)) != 2 or "." in ws:
            continue
        lead, c = xs[:-1], xs[-1:]
        free = lead.replace("...", "")
        if len(set(free)) != len(free) or c not in ws or c in lead or "." in c:
            continue
        o = ws.replace(c, "")
        if o in xs or out != lead + o:
            continue
        if "..." not in lead and len(lead) != tval(x).dim() - 1:
            continue
        return x, w, ws == c + o
    return None


def _operands_fit(x, w) -> bool:
    xv, wv = tval(x), tval(w)
    return isinstance(x, fx.Node) and isinstance(w, fx.Node) and xv is not None and wv is not None \
        and xv.dim() >= 2 and wv.dim() == 2  # fmt: skip


def _to_linear(g: fx.Graph, n: fx.Node, x: fx.Node, w: fx.Node, transposed: bool) -> None:
    if transposed:
        with g.inserting_before(n):
            wt = g.call_method("t", (w,))
        wt.meta["example_value"] = tval(w).t()
        w = wt
    _replace(g, n, _compat.LINEAR, (x, w, None))


def _replace(g: fx.Graph, old: fx.Node, target, args: tuple) -> fx.Node:
    """``target(*args)`` in ``old``'s place, with ``old``'s metadata (its fake value: the same value), and
    ``old`` erased."""
    with g.inserting_before(old):
        new = g.call_function(target, args)
    new.meta.update(old.meta)
    old.replace_all_uses_with(new)
    g.erase_node(old)
    return new


def _is_reshape(n) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_method" and n.target in ("view", "reshape")


def _fold_token_flattening(g: fx.Graph) -> None:
    for outer in list(g.nodes):
        if not _is_reshape(outer) or linear_args(outer.args[0]) is None:
            continue
        lin = outer.args[0]
        x2, w, b = linear_args(lin)
        if len(lin.users) != 1 or not _is_reshape(x2):
            continue
        x = x2.args[0]
        xv, ov, lv = tval(x), tval(outer), tval(lin)
        if xv is None or ov is None or lv is None or xv.dim() < 2 or tval(x2).dim() != 2:
            continue
        if list(ov.shape) != [*xv.shape[:-1], lv.shape[-1]]:
            continue
        _replace(g, outer, _compat.LINEAR, (x, w, b))
        g.erase_node(lin)
        if not x2.users:
            g.erase_node(x2)
