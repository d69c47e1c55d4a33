"""The normalize pass: one spelling for what Dynamo versions record differently."""

import operator

import torch
import torch.nn.functional as F

from mst_compile.passes import run_passes
from mst_compile.passes.dynamo.context import PassContext
from tests.conftest import SMALL, dynamo_graph, regions

S = 12


def _as_methods(gm):
    """Each comparison spelled as a method call, as torch 2.11's Dynamo records ``x == y`` (``x.__eq__(y)``)."""
    names = {operator.eq: "__eq__", operator.ne: "__ne__", operator.le: "__le__", operator.lt: "__lt__"}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in names:
            n.op, n.target = "call_method", names[n.target]
    gm.recompile()
    return gm


def test_comparisons_recorded_as_methods_are_matched_as_the_operators():
    """HF's packed-sequence test in a causal mask (``==``, ``!=``, ``<=``): proven causal in either spelling."""

    def f(q, k, v):
        pos = torch.arange(S)[None]
        packed = (torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1).cumsum(-1)
        causal = torch.arange(S)[None, :] <= torch.arange(S)[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal & (packed[0][:, None] == packed[0][None, :]))

    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(1, 2, S, 8, generator=g) for _ in range(3)]
    gm, ex = dynamo_graph(f, *qkv)
    gm = _as_methods(gm)
    methods = [n.target for n in gm.graph.nodes if n.op == "call_method" and n.target.startswith("__")]
    assert sorted(methods) == ["__eq__", "__le__", "__ne__"]
    ctx = PassContext(SMALL, torch.is_grad_enabled())
    out = run_passes(gm, ctx)
    [mask] = regions(ctx, "mask")
    assert mask.status == "rewritten", mask.reason
    assert not any(n.op == "call_method" and n.target.startswith("__") for n in out.graph.nodes)
    torch.testing.assert_close(out(*ex)[0], f(*qkv))
