"""Pattern matching on traced graphs: the vocabulary projection + cross-entropy."""

import pytest
import torch

import mst_compile
import torch.nn.functional as F

from tests.conftest import assert_close_rel, calls, regions, rewrite
from mst_compile.plan import chunk_plan
from tests.modules import LMHead


def _heads(ctx, status):
    return regions(ctx, "head", status)


def _calls(gm):
    return calls(gm, "linear_ce")


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"upcast": False},
        {"softcap": 5.0},
        {"scale": 0.5, "bias": True},
        {"shift": True},
        {"reduction": "sum"},
        {"smoothing": 0.1},
    ],
    ids=["upcast", "no-upcast", "softcap", "scale-bias", "shift", "sum", "smoothing"],
)
def test_finds_head_and_matches_eager(kw):
    head = LMHead(**kw)
    hs = torch.randn(2, 7, 16, requires_grad=True)
    y = torch.randint(0, 200, (2, 7))
    y[0, :3] = -100
    gm, ctx, ex = rewrite(head, hs, y, config=mst_compile.MSTConfig(num_chunks=3))
    assert len(_heads(ctx, "rewritten")) == 1, ctx.regions
    assert len(_calls(gm)) == 1
    assert not [n for n in gm.graph.nodes if n.target is F.cross_entropy]
    ref = head(hs, y)
    ref_grads = torch.autograd.grad(ref, [hs, *head.parameters()])
    out = gm(*ex)[0]
    got_grads = torch.autograd.grad(out, [hs, *head.parameters()])
    torch.testing.assert_close(out, ref)
    for g, r in zip(got_grads, ref_grads):
        assert_close_rel(g, r)


def test_one_automatic_chunk_is_left_to_inductor_and_a_fixed_count_is_kept():
    """NOTE [one chunk is whole]: a head whose automatic plan is one chunk stays whole (the softcapped one
    included: Inductor fuses its tail); a count the user fixed, one included, is kept."""
    hs, y = torch.randn(2, 7, 16), torch.randint(0, 200, (2, 7))
    for head in (LMHead(), LMHead(softcap=5.0)):
        _, ctx, _ = rewrite(head, hs, y, config=mst_compile.MSTConfig())
        (r,) = regions(ctx, "head", "skipped")
        assert "NOTE [one chunk is whole]" in r.reason, r.reason
    _, ctx, _ = rewrite(LMHead(softcap=5.0), hs, y, config=mst_compile.MSTConfig(num_chunks=1))
    assert len(_heads(ctx, "rewritten")) == 1, ctx.regions


def test_memory_budget_sets_the_head_chunk_size():
    """A chunk's fp32 logits (V=40: 160 B per token) stay under ``chunk_memory_mib``; values stay exact."""
    torch.manual_seed(0)
    head, h, y = LMHead(h=16, v=40), torch.randn(2, 12, 16), torch.randint(0, 40, (2, 12))
    gm, ctx, ex = rewrite(head, h, y, config=mst_compile.MSTConfig(chunk_memory_mib=160 * 7 / 2**20))
    (r,) = regions(ctx, "head", "rewritten")
    assert r.chunks == "4"  # ceil(24 tokens / 7 per chunk)
    assert_close_rel(gm(*ex)[0], head(h, y))


def test_large_vocabulary_lowers_the_minimum_chunk():
    """NOTE [minimum chunk]: a 512-token chunk of V=90000 fp32 logits is 176 MiB (> 64), so the automatic policy
    goes down to 256-token chunks (3 for 768 tokens); a set ``min_chunk_tokens`` wins (2 at 512 tokens each)."""
    head, h, y = LMHead(h=8, v=90000), torch.randn(1, 768, 8), torch.randint(0, 90000, (1, 768))
    with torch.no_grad():
        _, ctx, _ = rewrite(head, h, y, config=mst_compile.MSTConfig())
        (r,) = regions(ctx, "head", "rewritten")
        assert r.chunks == "3"
        torch._dynamo.reset()
        _, ctx, _ = rewrite(head, h, y, config=mst_compile.MSTConfig(min_chunk_tokens=384))
        assert regions(ctx, "head", "rewritten")[0].chunks == "2"


def test_minimum_chunk_policy():
    cfg = mst_compile.MSTConfig()
    assert cfg.min_rows(32000 * 4) == 512  # Llama-sized vocabulary: 62.5 MiB per 512 tokens, unchanged
    assert cfg.min_rows(151936 * 4) == 256  # Qwen-sized: never below 256
    assert cfg.min_rows(50000 * 4) == 335  # in between: the largest chunk under 64 MiB
    assert mst_compile.MSTConfig(min_chunk_tokens=64).min_rows(151936 * 4) == 64
    plan = chunk_plan(cfg, rows=4096, input_size=1, wide_size=300, row_bytes=151936 * 4)
    assert plan.label == "16" and plan.rows_in_first_chunk(4096) == 256


def test_head_is_not_taken_for_an_mlp():
    _, ctx, _ = rewrite(LMHead(), torch.randn(1, 5, 16), torch.randint(0, 200, (1, 5)))
    assert not regions(ctx, "mlp")


def test_returned_logits_are_routed_to_the_runner():
    head = LMHead(return_logits=True)
    _, ctx, _ = rewrite(head, torch.randn(1, 5, 16, requires_grad=True), torch.randint(0, 200, (1, 5)))
    assert len(_heads(ctx, "rewritten")) == 1
    (lo,) = ctx.logits_outputs
    assert lo.mode == "bridge" and lo.slots == [1]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_returned_logits_with_a_shifted_loss(reduction):
    """The model returns all logits and its loss reads ``logits[..., :-1, :]`` (OPT, older HF models)."""
    head = LMHead(shift=True, return_logits=True, reduction=reduction)
    hs, y = torch.randn(2, 7, 16, requires_grad=True), torch.randint(0, 200, (2, 7))
    y[1, 2] = -100
    gm, ctx, ex = rewrite(head, hs, y)
    assert len(_heads(ctx, "rewritten")) == 1, ctx.regions
    loss, logits = head(hs, y)
    out = gm(*ex)
    torch.testing.assert_close(out[0], loss)
    torch.testing.assert_close(out[1], logits.detach())
    for g, r in zip(torch.autograd.grad(out[0], [hs, *head.parameters()]),
                    torch.autograd.grad(loss, [hs, *head.parameters()])):  # fmt: skip
        assert_close_rel(g, r)


def test_logits_only_model_has_nothing_to_fuse():
    proj = torch.nn.Linear(16, 200)
    gm, ctx, _ = rewrite(proj, torch.randn(1, 5, 16))
    assert not _calls(gm) and not _heads(ctx, "rewritten")


class WeightedLoss(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 50)
        self.register_buffer("w", torch.rand(50))

    def forward(self, hs, y):
        return F.cross_entropy(self.proj(hs).view(-1, 50), y.view(-1), weight=self.w)


class LogitsUsedTwice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 50)

    def forward(self, hs, y):
        logits = self.proj(hs)
        return F.cross_entropy(logits.view(-1, 50), y.view(-1)) + logits.square().mean()


class NoneReduction(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 50)

    def forward(self, hs, y):
        return F.cross_entropy(self.proj(hs).view(-1, 50), y.view(-1), reduction="none").mean()


@pytest.mark.parametrize(
    "module,why",
    [(WeightedLoss(), "class weights"), (LogitsUsedTwice(), "also used"), (NoneReduction(), "reduction")],
    ids=["weighted", "logits-reused", "reduction-none"],
)
def test_near_misses_are_left_alone(module, why):
    hs, y = torch.randn(1, 6, 16), torch.randint(0, 50, (1, 6))
    gm, ctx, ex = rewrite(module, hs, y)
    assert not _calls(gm)
    (r,) = _heads(ctx, "skipped")
    assert why in r.reason
    torch.testing.assert_close(gm(*ex)[0], module(hs, y))


class _Head(torch.nn.Module):
    """``F.cross_entropy(linear(h), target)`` with whatever target it is given (no reshape in between)."""

    def __init__(self, v=50):
        super().__init__()
        self.proj = torch.nn.Linear(16, v, bias=False)

    def forward(self, hs, target):
        return F.cross_entropy(self.proj(hs), target)


@pytest.mark.parametrize(
    "make,why",
    [
        (lambda n: torch.softmax(torch.randn(n, 50), -1), "class probabilities"),
        (lambda n: torch.rand(n, 50), "class probabilities"),
    ],
    ids=["probabilities", "soft-targets"],
)
def test_targets_the_op_does_not_compute_are_left_alone(make, why):
    """NOTE [guarded head]: matched only when the op computes exactly that loss; else the original op runs."""
    hs = torch.randn(12, 16)
    target = make(12)
    gm, ctx, ex = rewrite(_Head(), hs, target)
    assert not _calls(gm)
    (r,) = _heads(ctx, "skipped")
    assert why in r.reason, r.reason


def test_class_probability_loss_compiles_and_matches_eager():
    """The distillation / mixup loss ``cross_entropy(logits, probs)`` runs end to end under mst, as eager."""
    head, hs = _Head(), torch.randn(4096 // 64, 16)
    probs = torch.softmax(torch.randn(hs.shape[0], 50), -1)
    got = torch.compile(head, backend="mst", options={"compiler": "aot_eager"})(hs, probs)
    torch.testing.assert_close(got, head(hs, probs))
    assert mst_compile.counters["head_rewritten"] == 0 and mst_compile.counters["head_skipped"] == 1


def test_int32_labels_give_the_int64_result():
    """int32 labels (which Inductor accepts) are fused and read as int64: the loss eager gives for int64."""
    head, hs = _Head(), torch.randn(40, 16)
    y = torch.randint(0, 50, (40,))
    got = torch.compile(head, backend="mst", options={"compiler": "aot_eager", "num_chunks": 3})(hs, y.int())
    assert mst_compile.counters["head_rewritten"] == 1
    torch.testing.assert_close(got, head(hs, y))


def test_target_of_another_shape_is_left_alone():
    hs, y = torch.randn(2, 6, 16), torch.randint(0, 50, (2, 6))
    gm, ctx, _ = rewrite(lambda h, t: F.cross_entropy(_HEAD.proj(h).transpose(1, 2), t), hs, y)
    assert not _calls(gm)


_HEAD = _Head()


def test_fake_kernel_refuses_what_it_does_not_compute():
    """A mismatch between a match and the op fails while tracing (compile time), not in the compiled step."""
    from mst_compile.ops import registry
    from mst_compile.ops.spec import HeadSpec

    key = registry.register_cast(torch.float32)
    spec = HeadSpec(key, key, needs=(False, False, False)).dumps()
    h, w = torch.randn(8, 16), torch.randn(50, 16)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fh, fw = mode.from_tensor(h), mode.from_tensor(w)
        for labels in (torch.zeros(8, dtype=torch.int32), torch.zeros(7, dtype=torch.int64), torch.zeros(8, 50)):
            with pytest.raises(RuntimeError, match="mst::linear_ce"):
                torch.ops.mst.linear_ce(fh, fw, None, mode.from_tensor(labels), spec)


@pytest.mark.parametrize("kw", [{}, {"upcast": False}, {"return_logits": True}],
                         ids=["upcast", "no-upcast", "logits-returned"])  # fmt: skip
def test_compiled_bodies_reach_the_chunk_cross_entropy(kw):
    """With ``compile_bodies`` on, a head with no row-wise tail runs each chunk's cross-entropy as Inductor code
    (NOTE [compiled bodies]), whether the loss reads the logits as they are or after an explicit ``.float()``
    (HF's form); with it off, op by op. Detection only: no kernel is compiled here."""
    from mst_compile.ops import registry
    from mst_compile.ops.spec import HeadSpec, parse

    hs, y = torch.randn(2, 7, 16, requires_grad=True), torch.randint(0, 200, (2, 7))
    for bodies, compiled in (("always", True), ("never", False)):
        cfg = mst_compile.MSTConfig(num_chunks=3, compile_bodies=bodies)
        gm, ctx, _ = rewrite(LMHead(**kw), hs, y, config=cfg)
        (call,) = _calls(gm)
        spec = parse(call.args[-1], HeadSpec)
        post = registry.get(spec.post)
        assert post.cast_only and post.compiled is compiled, (bodies, post)
