"""The MoE pass: which mixture-of-experts blocks it chunks (HF transformers' experts forms), what it leaves
alone (NOTE [token-wise MoE]), and parity with eager: loss, load-balancing loss, logits, every gradient."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import mst_compile
from mst_compile.bench import moe as moe_bench
from tests.conftest import assert_close_rel, assert_matches_eager, calls, grads, regions, rewrite

transformers = pytest.importorskip("transformers")

ARCHS = ("mixtral", "qwen3_moe")
IMPLS = ("grouped_mm", "batched_mm")
OPTIONS = {"num_chunks": 3, "compiler": "aot_eager"}


def tiny(arch, impl, **over):
    """A 2-layer MoE LM small enough for aot_eager tests (8 experts, top-2, aux loss weighted so that its
    gradient matters next to the LM loss's)."""
    sizes = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=48, vocab_size=97, head_dim=8,
                 router_aux_loss_coef=0.5)  # fmt: skip
    if arch == "mixtral":
        sizes.pop("moe_intermediate_size")
    return moe_bench.build(arch, impl, **{**sizes, **over})


def block(arch, impl):
    """One sparse MoE block of ``arch`` (its router, experts and combine) on its own."""
    model = tiny(arch, impl)
    return model.model.layers[0].mlp


class CapacityMoE(torch.nn.Module):
    """Batched experts with capacity-factor routing: a token is dropped when its expert has already taken
    ``capacity`` earlier tokens of the batch (a cumulative count over all tokens): not token-wise."""

    def __init__(self, h=16, i=32, e=4, k=2, capacity=3):
        super().__init__()
        self.router = torch.nn.Linear(h, e, bias=False)
        self.w1 = torch.nn.Parameter(torch.randn(e, i, h) * 0.1)
        self.w2 = torch.nn.Parameter(torch.randn(e, h, i) * 0.1)
        self.k, self.e, self.capacity = k, e, capacity

    def forward(self, x):
        t, h = x.shape
        logits = self.router(x)
        w, idx = torch.topk(logits.softmax(-1), self.k, dim=-1)
        mask = F.one_hot(idx.reshape(-1), self.e).float()  # [T*k, E]
        keep = ((mask.cumsum(0) * mask).sum(-1) <= self.capacity).float()  # position in its expert's queue
        rows = x.repeat_interleave(self.k, dim=0)
        ids = idx.reshape(-1)
        y = torch.bmm(self.w1[ids], rows.unsqueeze(-1)).squeeze(-1).relu()
        y = torch.bmm(self.w2[ids], y.unsqueeze(-1)).squeeze(-1)
        y = y * (w.reshape(-1) * keep).unsqueeze(-1)
        return y.view(t, self.k, h).sum(1), logits


class UnsortedGrouped(torch.nn.Module):
    """Rows sorted by expert and combined in sorted order (the permutation never undone): not token-wise."""

    def __init__(self, h=16, e=4, k=2):
        super().__init__()
        self.router = torch.nn.Linear(h, e, bias=False)
        self.w = torch.nn.Parameter(torch.randn(e, h, h) * 0.1)
        self.k = k

    def forward(self, x):
        t, h = x.shape
        w, idx = torch.topk(self.router(x).softmax(-1), self.k, dim=-1)
        ids, perm = torch.sort(idx.reshape(-1))
        rows = x[perm // self.k]
        y = torch.bmm(self.w[ids], rows.unsqueeze(-1)).squeeze(-1) * w.reshape(-1)[perm].unsqueeze(-1)
        return y.view(t, self.k, h).sum(1)


# -- traced graphs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_hf_block_is_one_region_and_matches_eager(arch, impl):
    blk = block(arch, impl)
    x = torch.randn(2, 7, 32, requires_grad=True)
    gm, ctx, ex = rewrite(blk, x, config=mst_compile.MSTConfig(num_chunks=3))
    (r,) = regions(ctx, "moe", "rewritten")
    assert r.chunks == "3" and not regions(ctx, "moe", "skipped") and not regions(ctx, "mlp")
    assert len(calls(gm, "rowwise")) == 1
    # nothing of the block is left outside the op: no top-k, no sort, no expert matmul
    left = {getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes if n.op != "placeholder"}
    assert not left & {"topk", "sort", "bmm", "histc", "repeat_interleave"}, left
    assert_matches_eager(gm, ex, blk, x, torch.randn(2, 7, 32))


def test_router_logits_are_a_second_output():
    model = tiny("mixtral", "grouped_mm", num_hidden_layers=1, output_router_logits=True)
    ids = torch.randint(0, 97, (1, 10))
    torch.compile(model, backend="mst", options=OPTIONS)(input_ids=ids, labels=ids)
    (r,) = [r for rep in mst_compile.reports(model) for r in rep.rewritten("moe")]
    assert "outputs=['router_logits', " in r.shapes, r.shapes  # the logits and the block's output


def test_capacity_routing_is_left_alone():
    m = CapacityMoE()
    _, ctx, _ = rewrite(m, torch.randn(12, 16), config=mst_compile.MSTConfig(num_chunks=3))
    (r,) = regions(ctx, "moe", "skipped")
    assert "works along the token dimension" in r.reason and "cumsum" in r.reason, r.reason


def test_an_unrestored_sort_is_left_alone():
    _, ctx, _ = rewrite(UnsortedGrouped(), torch.randn(12, 16), config=mst_compile.MSTConfig(num_chunks=3))
    (r,) = regions(ctx, "moe", "skipped")
    assert "permuted rows" in r.reason, r.reason


def test_a_statistic_over_tokens_after_the_block_stays_outside():
    """Reading the block's output across tokens (a mean over the batch) is outside the region: still chunked."""
    blk = block("mixtral", "batched_mm")

    def f(x):
        y = blk(x)
        return y - y.mean(dim=(0, 1))

    x = torch.randn(2, 6, 32)
    gm, ctx, ex = rewrite(f, x, config=mst_compile.MSTConfig(num_chunks=3))
    assert len(regions(ctx, "moe", "rewritten")) == 1
    assert_close_rel(gm(*ex)[0], f(x))


def test_eager_experts_loop_breaks_the_graph():
    """HF's ``eager`` experts loop over ``nonzero()`` of the expert mask: Dynamo cannot hold the block in one
    graph, so nothing is chunked (and the compiled model is still exact)."""
    blk = block("mixtral", "eager")
    explained = torch._dynamo.explain(blk)(torch.randn(1, 5, 32))
    assert explained.graph_break_count >= 1


def test_mlp_off_turns_the_moe_pass_off():
    _, ctx, _ = rewrite(block("qwen3_moe", "grouped_mm"), torch.randn(1, 6, 32), config=mst_compile.MSTConfig(mlp=False))
    assert not regions(ctx, "moe")


# -- parity through the backend ----------------------------------------------------------------------------------


def _parity(model, lengths=(13,), dynamic=None, rtol=1e-5):
    cm = torch.compile(model, backend="mst", options=OPTIONS, dynamic=dynamic)
    worst = {}
    for n in lengths:
        ids = torch.randint(0, 97, (2, n), generator=torch.Generator().manual_seed(n))
        ref = model(input_ids=ids, labels=ids)
        ref.loss.backward()
        ref_g = grads(model)
        model.zero_grad(set_to_none=True)
        out = cm(input_ids=ids, labels=ids)
        out.loss.backward()
        got_g = grads(model)
        model.zero_grad(set_to_none=True)
        assert out.loss.dtype == ref.loss.dtype
        for name, a, b in [("loss", out.loss, ref.loss), ("aux_loss", out.aux_loss, ref.aux_loss),
                           ("logits", out.logits, ref.logits)] + [(k, got_g[k], ref_g[k]) for k in ref_g]:  # fmt: skip
            assert_close_rel(a, b, rtol=rtol, name=name)
            err = ((a.detach() - b.detach()).abs().max() / b.detach().abs().max().clamp_min(1e-30)).item()
            worst[name] = max(worst.get(name, 0.0), err)
        assert got_g.keys() == ref_g.keys()
    return worst


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_model_with_aux_loss_matches_eager(arch, impl):
    model = tiny(arch, impl, output_router_logits=True)
    _parity(model)
    c = mst_compile.counters
    assert c["moe_rewritten"] == 2 and not c["moe_skipped"], [str(r) for r in mst_compile.reports()]


def test_dynamic_lengths_one_graph():
    model = tiny("mixtral", "grouped_mm", output_router_logits=True)
    _parity(model, lengths=(9, 14), dynamic=True)
    c = mst_compile.counters
    assert c["graphs"] == 1 and c["moe_rewritten"] == 2, [str(r) for r in mst_compile.reports()]


def test_eager_experts_compile_exactly_unchanged():
    model = tiny("mixtral", "eager", output_router_logits=True)
    _parity(model)
    assert not mst_compile.counters["moe_rewritten"]


# -- memory after Inductor ---------------------------------------------------------------------------------------


def _peak(arm, impl):
    cmd = [sys.executable, "-m", "mst_compile.bench.moe", "--arm", arm, "--impl", impl, "--tokens", "4096"]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert lines, p.stderr[-2000:]
    return json.loads(lines[-1])


@pytest.mark.slow
def test_inductor_step_peak_below_torch_compile():
    """Mixtral (grouped experts, the transformers default) at 4096 tokens, each arm in its own process."""
    base, mst = _peak("compile", "grouped_mm"), _peak("mst", "grouped_mm")
    assert mst["moe_rewritten"] == 2
    assert abs(mst["loss"] - base["loss"]) < 1e-4 * abs(base["loss"])
    # measured here (2 CPU cores, torch 2.13): 29.9 vs 233.3 MiB (0.13); batched_mm: 278.5 vs 6364.8 MiB
    assert mst["peak_mib"] < 0.4 * base["peak_mib"], (mst["peak_mib"], base["peak_mib"])


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_model_calls_grouped_mm_itself_and_is_chunked(arch):
    """With bf16 weights HF calls ``torch._grouped_mm`` (Dynamo spells out ``bias=None, out_dtype=None``) instead
    of its fp32 fallback op: the block is one region all the same, and loss, aux loss and gradients stay as
    close to eager's bf16 run as bf16 allows (each row's math is eager's; weight gradients summed in fp32)."""
    _parity(tiny(arch, "grouped_mm", output_router_logits=True).to(torch.bfloat16), rtol=3e-2)
    assert mst_compile.counters["moe_rewritten"] == 2, [str(r) for r in mst_compile.reports()]


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpointed_moe_is_one_graph_and_chunked_with_the_recipe(arch):
    """Under HF gradient checkpointing the router-logit recorders break the graph at every layer (NOTE
    [checkpointed layer tracing]); after ``trace_checkpointed_moe`` (the recipe's earlier name) the step is one
    graph, each checkpointed layer's MoE block is chunked, and loss, load-balancing loss, logits and every
    gradient match eager's."""
    model = tiny(arch, "grouped_mm", output_router_logits=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch._dynamo.reset()
    mst_compile.reset_counters()
    with mst_compile._compat.dynamo_config().patch(skip_fwd_side_effects_in_bwd_under_checkpoint=False):  # restored
        mst_compile.recipes.trace_checkpointed_moe(model)
        _parity(model)
    c = mst_compile.counters
    assert c["graphs"] == 1 and c["moe_rewritten"] == 2, [str(r) for r in mst_compile.reports()]
