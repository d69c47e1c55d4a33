"""The MoE pass on an expert loop that dispatches with ``torch.where(mask)`` (litgpt's ``LLaMAMoE`` layout,
NOTE [selected rows]): chunked when Dynamo captures ``torch.where``, exact, and left alone where the selection
is not token-wise."""

import pytest
import torch

import mst_compile
from tests.conftest import assert_matches_eager, calls, grads, regions, rewrite
from tests.frameworks.helpers import assert_same_training_step

CONFIG = mst_compile.MSTConfig(num_chunks=3)


@pytest.fixture(autouse=True)
def _capture_where():
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        yield


class WhereLoopMoE(torch.nn.Module):
    """litgpt's ``LLaMAMoE`` forward, as it is written there: top-k router, a mask per expert, ``torch.where``
    dispatch, ``y[token_idx] += probs * expert(x[token_idx])``."""

    def __init__(self, h=16, i=24, e=4, k=2, capacity=None, tokens_last=False, into_input=False):
        super().__init__()
        self.gate = torch.nn.Linear(h, e, bias=False)
        self.experts = torch.nn.ModuleList(
            torch.nn.ModuleDict({"fc_1": torch.nn.Linear(h, i, bias=False), "fc_2": torch.nn.Linear(h, i, bias=False),
                                 "proj": torch.nn.Linear(i, h, bias=False)}) for _ in range(e))  # fmt: skip
        self.e, self.k, self.capacity, self.tokens_last, self.into_input = e, k, capacity, tokens_last, into_input

    def forward(self, x):
        b, t, c = x.size()
        x = x.view(-1, c)
        router = self.gate(x)
        probs, indices = torch.topk(router, self.k)
        probs = probs.softmax(dim=1, dtype=torch.float).to(dtype=x.dtype)
        masks = indices.unsqueeze(-1) == torch.arange(self.e, device=x.device)
        masks = masks.permute(2, 1, 0) if self.tokens_last else masks.permute(2, 0, 1)
        y = x if self.into_input else torch.zeros_like(x)  # the first: adds the experts onto the input itself
        for mask, ex in zip(masks, self.experts):
            if self.tokens_last:  # HF's eager layout: [k, T] per expert
                expert_idx, token_idx = torch.where(mask)
            else:
                token_idx, expert_idx = torch.where(mask)
            if self.capacity is not None:  # the first ``capacity`` tokens of the batch: not token-wise
                token_idx, expert_idx = token_idx[: self.capacity], expert_idx[: self.capacity]
            h = x[token_idx]
            h = ex["proj"](torch.nn.functional.silu(ex["fc_1"](h)) * ex["fc_2"](h))
            y[token_idx] += probs[token_idx, expert_idx, None] * h
        return y.view(b, t, c)


def test_where_loop_is_one_region_and_matches_eager():
    m = WhereLoopMoE()
    x = torch.randn(2, 7, 16, requires_grad=True)  # 14 tokens in 3 chunks: a ragged tail
    gm, ctx, ex = rewrite(m, x, config=CONFIG)
    (r,) = regions(ctx, "moe", "rewritten")
    assert r.chunks == "3" and not regions(ctx, "moe", "skipped") and not regions(ctx, "mlp"), ctx.regions
    assert len(calls(gm, "rowwise")) == 1
    left = {getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes if n.op != "placeholder"}
    assert not left & {"where", "topk", "linear", "setitem"}, left  # the whole loop is inside the op
    assert_matches_eager(gm, ex, m, x, torch.randn(2, 7, 16))


def test_without_capture_the_loop_breaks_the_graph():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=False):
        explained = torch._dynamo.explain(WhereLoopMoE())(torch.randn(1, 5, 16))
    # Dynamo gives up on the frame (a break inside the loop) or breaks it: no graph holds the selection
    assert not any("torch.where" in g.code for g in explained.graphs), [g.code for g in explained.graphs]
    assert explained.graph_count == 0 or explained.graph_break_count >= 1


def test_a_capacity_cut_of_the_selection_is_left_alone():
    """``token_idx[:C]`` keeps the first C tokens of the whole batch: a chunk would keep others."""
    _, ctx, _ = rewrite(WhereLoopMoE(capacity=3), torch.randn(2, 7, 16), config=CONFIG)
    (r,) = regions(ctx, "moe", "skipped")
    assert "routing value" in r.reason, r.reason


def test_a_mask_with_tokens_last_is_left_alone():
    """A ``[k, T]`` mask per expert: its selection's token coordinate is not the first; not proven here."""
    _, ctx, _ = rewrite(WhereLoopMoE(tokens_last=True), torch.randn(2, 7, 16), config=CONFIG)
    (r,) = regions(ctx, "moe", "skipped")
    assert "not a token-row tensor" in r.reason, r.reason


def test_an_indexed_write_into_the_input_is_left_alone():
    """``x[token_idx] += ...`` writes into the block's input, which every chunk's recompute reads again."""
    _, ctx, _ = rewrite(WhereLoopMoE(into_input=True), torch.randn(2, 7, 16), config=CONFIG)
    (r,) = regions(ctx, "moe", "skipped")
    assert "not the region's own new rows" in r.reason, r.reason


class WhereLoopLM(torch.nn.Module):
    """Embedding, one ``WhereLoopMoE`` block with a residual, a norm and an LM head with cross-entropy."""

    def __init__(self, v=61, h=16):
        super().__init__()
        self.emb = torch.nn.Embedding(v, h)
        self.moe = WhereLoopMoE(h=h)
        self.norm = torch.nn.RMSNorm(h)
        self.head = torch.nn.Linear(h, v, bias=False)

    def forward(self, ids):
        x = self.emb(ids)
        x = x + self.moe(x)
        logits = self.head(self.norm(x))
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def test_model_through_the_backend_matches_eager():
    torch.manual_seed(0)
    model = WhereLoopLM()
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(1))
    ref = model(ids)
    ref.backward()
    ref_g = grads(model)
    model.zero_grad(set_to_none=True)
    mst_compile.reset_counters()
    loss = torch.compile(model, backend="mst", options={"num_chunks": 3, "compiler": "aot_eager"})(ids)
    loss.backward()
    assert mst_compile.counters["moe_rewritten"] == 1 and mst_compile.counters["graphs"] == 1, dict(
        mst_compile.counters
    )
    assert_same_training_step(ref, ref_g, loss, model)
