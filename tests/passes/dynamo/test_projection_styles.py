"""MLPs spelled the ways model code outside transformers spells them, on traced graphs: einsum and ``@``
projections (normalized to ``linear``), ``F.glu`` / ``nn.GLU``, and a parallel block whose attention and MLP
read one norm (NOTE [shared input] in ``passes/dynamo/mlp.py``)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.conftest import assert_matches_eager, calls, regions, rewrite

H, I = 16, 48


class EinsumMLP(nn.Module):
    """Weights kept ``[in, out]``, projections by einsum (flax / mesh-tensorflow style)."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(H, I) * 0.1), nn.Parameter(torch.randn(I, H) * 0.1)

    def forward(self, x):
        return torch.einsum("btf,fd->btd", F.gelu(torch.einsum("btd,df->btf", x, self.w1)), self.w2)


class EinsumSwiGLU(nn.Module):
    """Weights ``[out, in]`` as ``nn.Linear`` keeps them, einsum over an ellipsis, the weight first once."""

    def __init__(self):
        super().__init__()
        self.w1, self.w3 = nn.Parameter(torch.randn(I, H) * 0.1), nn.Parameter(torch.randn(I, H) * 0.1)
        self.w2 = nn.Parameter(torch.randn(H, I) * 0.1)

    def forward(self, x):
        g = torch.einsum("...d,fd->...f", x, self.w1)
        u = torch.einsum("fd,...d->...f", self.w3, x)
        return torch.einsum("...f,df->...d", F.silu(g) * u, self.w2)


class MatmulMLP(nn.Module):
    """``x @ W`` projections with a squared-ReLU (Primer / nanoGPT speedrun style)."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(H, I) * 0.1), nn.Parameter(torch.randn(I, H) * 0.1)

    def forward(self, x):
        return torch.matmul(F.relu(x @ self.w1).square(), self.w2)


class SequentialGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.ff = nn.Sequential(nn.Linear(H, 2 * I), nn.GLU(), nn.Dropout(0.0), nn.Linear(I, H))

    def forward(self, x):
        return self.ff(x)


class FunctionalGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.out = nn.Linear(H, 2 * I), nn.Linear(I, H)

    def forward(self, x):
        return self.out(F.glu(self.proj(x), dim=-1))


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
            return self.out(F.glu(self.proj(x), dim=1).repeat(1, 2, 1)[:, : x.shape[1]][..., :I])

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
