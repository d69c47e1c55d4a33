"""The normalize pass: one spelling for what Dynamo versions record differently."""

import operator

import torch

from mst_compile.passes import run_passes
from mst_compile.passes.dynamo.context import PassContext
from tests.conftest import SMALL, dynamo_graph, regions
from tests.passes.dynamo.test_causal_mask_pass import _qkv, packed_causal_attention


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
    qkv = _qkv()
    gm, ex = dynamo_graph(packed_causal_attention, *qkv)
    gm = _as_methods(gm)
    methods = [n.target for n in gm.graph.nodes if n.op == "call_method" and n.target.startswith("__")]
    assert sorted(methods) == ["__eq__", "__le__", "__ne__"]
    ctx = PassContext(SMALL, torch.is_grad_enabled())
    out = run_passes(gm, ctx)
    [mask] = regions(ctx, "mask")
    assert mask.status == "rewritten", mask.reason
    assert not any(n.op == "call_method" and n.target.startswith("__") for n in out.graph.nodes)
    torch.testing.assert_close(out(*ex)[0], packed_causal_attention(*qkv))
