"""MLPs spelled the ways model code outside transformers spells them (the modules of
``examples/frameworks.py``), on traced graphs: einsum and ``@``
projections (normalized to ``linear``), ``F.glu`` / ``nn.GLU``, and a parallel block whose attention and MLP
read one norm (NOTE [shared input] in ``passes/dynamo/mlp.py``)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.conftest import assert_matches_eager, calls, regions, rewrite
from tests.frameworks.helpers import examples

H = 16
EX = examples()
EinsumMLP, EinsumSwiGLU, MatmulMLP, SequentialGLU, FunctionalGLU = (
    EX.EinsumMLP, EX.EinsumSwiGLU, EX.MatmulMLP, EX.SequentialGLU, EX.FunctionalGLU)  # fmt: skip


class ParallelBlock(nn.Module):
    """One norm feeds a fused qkv (widening, not an MLP) and the MLP's fc1: Phi-2 / GPT-J / litgpt
    ``shared_attention_norm``."""

    def __init__(self):
        super().__init__()
        self.norm, self.qkv, self.proj = nn.LayerNorm(H), nn.Linear(H, 3 * H), nn.Linear(H, H)
        self.fc1, self.fc2 = nn.Linear(H, 4 * H), nn.Linear(4 * H, H)

    def forward(self, x):
        b, t, _ = x.shape
        n = self.norm(x)
        q, k, v = self.qkv(n).view(b, t, 3, 2, H // 2).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, H)
        return x + self.proj(a) + self.fc2(F.gelu(self.fc1(n), approximate="tanh"))


def _check(module, x, rewritten=1, skipped=0):
    gm, ctx, ex = rewrite(module, x)
    assert len(regions(ctx, "mlp", "rewritten")) == rewritten, ctx.regions
    assert len(regions(ctx, "mlp", "skipped")) == skipped, ctx.regions
    assert len(calls(gm, "rowwise")) == rewritten
    assert_matches_eager(gm, ex, module, x, torch.randn_like(module(x)))
    return gm


@pytest.mark.parametrize("module", [EinsumMLP(), EinsumSwiGLU(), MatmulMLP()], ids=["einsum", "einsum-swiglu", "matmul"])
def test_einsum_and_matmul_projections_are_chunked(module):
    gm = _check(module, torch.randn(2, 9, H, requires_grad=True))
    assert not [n for n in gm.graph.nodes if n.target in (torch.einsum, torch.matmul)]


@pytest.mark.parametrize("module", [SequentialGLU(), FunctionalGLU()], ids=["nn.GLU", "F.glu"])
def test_glu_on_the_feature_dimension_is_row_wise(module):
    _check(module, torch.randn(2, 9, H, requires_grad=True))


def test_glu_over_another_dimension_is_not_row_wise():
    class TokenGLU(FunctionalGLU):
        def forward(self, x):
            return self.out(F.glu(self.proj(x), dim=1).repeat(1, 2, 1)[:, : x.shape[1]][..., : self.out.in_features])

    _, ctx, _ = rewrite(TokenGLU(), torch.randn(2, 8, H))
    assert not regions(ctx, "mlp", "rewritten")


def test_einsum_that_is_not_a_projection_is_left_alone():
    """Attention scores by einsum (both operands are activations with token dims) stay as they are."""

    def scores(q, k):
        return torch.einsum("bhtd,bhsd->bhts", q, k).softmax(-1)

    gm, _, _ = rewrite(scores, torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))
    assert [n for n in gm.graph.nodes if n.target is torch.einsum]


def test_parallel_block_mlp_beside_a_rejected_qkv_is_chunked():
    """The fused qkv widens the norm output and is rejected (reshaped into heads); the fc1 reading the same
    norm output is an MLP of its own and is rewritten, with one skip record for the qkv."""
    _check(ParallelBlock(), torch.randn(2, 7, H, requires_grad=True), rewritten=1, skipped=1)
