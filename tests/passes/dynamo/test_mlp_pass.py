"""Pattern matching on traced graphs: which MLP regions the pass finds, and what it leaves alone."""

import pytest
import torch

import mst_compile

from tests.conftest import assert_close_rel, calls, regions, rewrite
from tests.modules import (
    AddmmMLP,
    AttentionLike,
    Block,
    FusedGateUp,
    GatedMLP,
    LeakyIntermediate,
    PlainMLP,
    StochasticMLP,
    TokenMixing,
)


def _mlp_regions(ctx, status):
    return regions(ctx, "mlp", status)


def _op_calls(gm):
    return calls(gm, "rowwise")


@pytest.mark.parametrize(
    "module",
    [
        GatedMLP(act="silu"),
        GatedMLP(act="gelu", bias=True),
        GatedMLP(act="gelu_tanh"),
        PlainMLP(act="gelu"),
        PlainMLP(act="relu", bias=False),
        PlainMLP(act="gelu_tanh"),
        AddmmMLP(),
        FusedGateUp(),
    ],
    ids=["swiglu", "geglu-bias", "geglu-tanh", "gelu-bias", "relu", "gelu-tanh", "addmm", "fused-gate-up"],
)
def test_finds_one_region_and_matches_eager(module):
    x = torch.randn(2, 9, 16, requires_grad=True)
    gm, ctx, ex = rewrite(module, x)
    rewritten = _mlp_regions(ctx, "rewritten")
    assert len(rewritten) == 1, ctx.regions
    assert len(_op_calls(gm)) == 1
    # no widening projection is left in the graph: the whole block is inside the op
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear]
    # the rewritten graph (custom ops, no Inductor) gives the same values and gradients as eager
    upstream = torch.randn(2, 9, 16)
    ref = module(x)
    ref_grads = torch.autograd.grad(ref, [x, *module.parameters()], upstream)
    out = gm(*ex)[0]
    got_grads = torch.autograd.grad(out, [x, *module.parameters()], upstream)
    torch.testing.assert_close(out, ref)
    for g, r in zip(got_grads, ref_grads):
        assert_close_rel(g, r)


def test_one_region_per_layer_in_a_stack():
    block = Block(GatedMLP(), layers=3)
    _, ctx, _ = rewrite(block, torch.randn(1, 5, 16))
    assert len(_mlp_regions(ctx, "rewritten")) == 3
    assert not _mlp_regions(ctx, "skipped")


def test_regions_record_the_nodes_and_chunks():
    _, ctx, _ = rewrite(GatedMLP(h=16, i=48), torch.randn(2, 8, 16), config=mst_compile.MSTConfig(min_chunk_tokens=1))
    (r,) = _mlp_regions(ctx, "rewritten")
    assert r.chunks == "6"  # auto: (48 + 48) / 16 widened features per input feature
    assert len(r.nodes) == 5  # gate, silu, up, mul, down
    _, ctx, _ = rewrite(GatedMLP(h=16, i=48), torch.randn(2, 8, 16), config=mst_compile.MSTConfig())
    (r,) = _mlp_regions(ctx, "skipped")  # 16 tokens: one chunk under the minimum, left whole
    assert "NOTE [one chunk is whole]" in r.reason, r.reason


def test_memory_budget_sets_the_chunk_size():
    """``chunk_memory_mib``: one chunk's widened tensors (gate, silu, up, mul: 4 x 48 fp32 = 768 B per token)
    stay under the budget; the chunk count follows the length."""
    budget = 768 * 5 / 2**20  # five tokens' worth
    _, ctx, _ = rewrite(GatedMLP(h=16, i=48), torch.randn(2, 8, 16), config=mst_compile.MSTConfig(chunk_memory_mib=budget))
    (r,) = _mlp_regions(ctx, "rewritten")
    assert r.chunks == "4"  # ceil(16 tokens / 5 per chunk)
    _, ctx, _ = rewrite(GatedMLP(h=16, i=48), torch.randn(2, 20, 16), config=mst_compile.MSTConfig(chunk_memory_mib=budget))
    assert _mlp_regions(ctx, "rewritten")[0].chunks == "8"


def test_attention_projections_are_not_mlps():
    gm, ctx, _ = rewrite(AttentionLike(), torch.randn(1, 6, 16))
    assert not _op_calls(gm)
    # the widening kv projection is a candidate, rejected because its output is reshaped into heads
    (r,) = _mlp_regions(ctx, "skipped")
    assert "not row-wise" in r.reason


@pytest.mark.parametrize(
    "module,why",
    [
        (LeakyIntermediate(), "graph output"),
        (TokenMixing(), "not row-wise"),
        (StochasticMLP(), "not row-wise"),
    ],
    ids=["leaky", "token-mixing", "dropout"],
)
def test_near_misses_are_left_alone(module, why):
    x = torch.randn(1, 6, 16)
    gm, ctx, ex = rewrite(module, x)
    assert not _op_calls(gm)
    skipped = _mlp_regions(ctx, "skipped")
    assert skipped and why in skipped[0].reason, ctx.regions


def test_disabled_by_config():
    import mst_compile

    gm, ctx, _ = rewrite(GatedMLP(), torch.randn(1, 5, 16), config=mst_compile.MSTConfig(mlp=False))
    assert not ctx.regions and not _op_calls(gm)
