"""Pass: rewrite projections spelled other ways into ``linear`` so the later passes see one form.

Before::  t = torch.addmm(b, x2d, W)            (GPT-2 ``Conv1D``; W is [in, out])
After::   t = torch._C._nn.linear(x2d, W.t(), b)

Only ``beta == alpha == 1`` is rewritten; the value is identical (``b + x @ W``). Then the token flattening
around such a projection is folded away, so the projection reads the unflattened input:

Before::  t = linear(x.view(-1, H), Wt, b).view(*x.shape[:-1], out)
After::   t = linear(x, Wt, b)
"""

from __future__ import annotations

import torch
from torch import fx

from .common import PassContext, linear_args, tval


def rewrite(gm: fx.GraphModule, ctx: PassContext) -> None:
    g = gm.graph
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
            lin = g.call_function(torch._C._nn.linear, (x, wt, bias))
        lin.meta.update(n.meta)
        n.replace_all_uses_with(lin)
        g.erase_node(n)
    _fold_token_flattening(g)


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
        with g.inserting_before(outer):
            new = g.call_function(torch._C._nn.linear, (x, w, b))
        new.meta.update(outer.meta)
        outer.replace_all_uses_with(new)
        g.erase_node(outer)
        g.erase_node(lin)
        if not x2.users:
            g.erase_node(x2)
