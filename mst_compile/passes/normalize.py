"""Pass: rewrite projections spelled other ways into ``linear`` so the later passes see one form.

Before::  t = torch.addmm(b, x2d, W)            (GPT-2 ``Conv1D``; W is [in, out])
After::   t = torch._C._nn.linear(x2d, W.t(), b)

Only ``beta == alpha == 1`` is rewritten; the value is identical (``b + x @ W``).
"""

from __future__ import annotations

import torch
from torch import fx

from .common import PassContext, tval


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
