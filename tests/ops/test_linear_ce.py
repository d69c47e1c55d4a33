import pytest
import torch
import torch.nn.functional as F

import mst_compile  # noqa: F401
from mst_compile.ops import registry
from mst_compile.ops.chunking import Chunks
from mst_compile.ops.linear_ce import fused_cross_entropy
from mst_compile.ops.spec import HeadSpec
from tests.conftest import assert_close_rel

F32 = registry.register_cast(torch.float32)
F64 = registry.register_cast(torch.float64)
SOFTCAP = registry.register_fn("test", "softcap", lambda z: torch.tanh(z / 3.0) * 3.0, -1, torch.float64)


def _spec(pre: str, post: str, **fields) -> str:
    return HeadSpec(pre, post, **fields).dumps()


def _case(n=37, h=8, v=50, seed=0, ignore="some"):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, v, (n,), generator=g)
    if ignore == "some":
        y[::3] = -100
    elif ignore == "all":
        y[:] = -100
    return hs, w, b, y


@pytest.mark.parametrize("ignore", ["none", "some", "all"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("post", ["cast", "softcap"])
@pytest.mark.parametrize("chunks", [1, 4, 37, 64])
def test_matches_eager(ignore, reduction, smoothing, post, chunks):
    hs, w, b, y = _case(ignore=ignore)
    tail = (lambda z: z) if post == "cast" else registry.get(SOFTCAP).fn
    ref = F.cross_entropy(tail(F.linear(hs, w, b)), y, reduction=reduction, label_smoothing=smoothing)
    ref_g = torch.autograd.grad(ref, (hs, w, b))
    key = F64 if post == "cast" else SOFTCAP
    out = torch.ops.mst.linear_ce(hs, w, b, y, _spec(F64, key, label_smoothing=smoothing, chunks=Chunks(chunks),
                                                     mean=reduction == "mean"))  # fmt: skip
    got_g = torch.autograd.grad(out[0], (hs, w, b))
    torch.testing.assert_close(out[0], ref, equal_nan=True)
    for a, e in zip(got_g, ref_g):  # an all-ignored mean: NaN loss, zero gradients, as eager
        torch.testing.assert_close(a, e)


def test_returns_logits_in_model_dtype():
    hs, w, b, y = _case()
    hs32, w32 = hs.detach().float(), w.detach().float()
    out = torch.ops.mst.linear_ce(hs32, w32, None, y, _spec(F32, F32, chunks=Chunks(5), needs=(False,) * 3,
                                                            want_logits=True))  # fmt: skip
    torch.testing.assert_close(out[5], F.linear(hs32, w32))
    assert out[5].dtype == torch.float32 and not out[5].requires_grad


def test_fused_cross_entropy_in_place_math():
    for eps in (0.0, 0.2):
        z = torch.randn(9, 13, dtype=torch.float64, requires_grad=True)
        y = torch.randint(0, 13, (9,))
        y[2] = -100
        ref = F.cross_entropy(z, y, reduction="sum", label_smoothing=eps)
        (g,) = torch.autograd.grad(ref, z)
        loss, g2 = fused_cross_entropy(z.detach().clone(), y, -100, eps, True)
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(g2, g)


@pytest.mark.slow
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_compiled_chunk_cross_entropy_matches_the_in_place_one(eps):
    """NOTE [compiled bodies]: the head's chunk cross-entropy as Inductor code (bf16 logits), one compile for
    every chunk size (301 rows: chunks of 101 and 100 rows, the labels' rows as dynamic as the logits'), the same
    loss and gradients as the in-place path to bf16 rounding."""
    torch.manual_seed(0)
    n, h, v = 301, 32, 1000
    x, w = torch.randn(n, h).bfloat16(), (torch.randn(v, h) * 0.1).bfloat16()
    y = torch.randint(0, v, (n,))
    y[:20] = -100
    pre = registry.register_cast(torch.bfloat16)
    specs = [_spec(pre, registry.register_cast(torch.bfloat16, None, compiled), label_smoothing=eps, chunks=Chunks(3),
                   needs=(True, True, False)) for compiled in (False, True)]  # fmt: skip
    outs = [torch.ops.mst.linear_ce(x, w, None, y, spec) for spec in specs]
    keys = [k for k in registry._COMPILED if k[0] == "cross_entropy" and k[-1] == eps]
    assert len(keys) == 1 and registry._COMPILED[keys[0]] is not None  # compiled once for the 3 chunks
    for i in (0, 2, 3):  # loss, dh, dw
        a, b = outs[1][i].double(), outs[0][i].double()
        assert ((a - b).abs().max() / b.abs().max()).item() < 2**-8, i  # one bf16 rounding step


def test_a_compiled_chunk_cross_entropy_that_fails_to_run_falls_back(monkeypatch):
    """NOTE [compiled bodies]: a run failure of the compiled cross-entropy is a missed fusion: the chunk gets the
    in-place path's result and the compiled function is not tried again."""
    from mst_compile.ops import linear_ce as mod

    z, y = torch.randn(17, 50).bfloat16(), torch.randint(0, 50, (17,))
    key = mod.ce_key(z, y, -100, 0.0)

    def broken(z, y):
        raise AssertionError("expected size 17==32")

    monkeypatch.setitem(registry._COMPILED, key, broken)
    loss, g = mod.compiled_cross_entropy(z, y, -100, 0.0, True)
    ref_loss, ref_g = mod.fused_cross_entropy(z.float(), y, -100, 0.0, True)
    assert registry._COMPILED[key] is None
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(g, ref_g)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_compiled_fp32_chunk_cross_entropy_writes_the_gradient_over_the_logits(eps):
    """NOTE [compiled bodies], fp32 logits: one compile for a full and a ragged chunk; the gradient is the logits'
    own storage (a chunk holds its logits alone, as the in-place path does), the values the in-place path's."""
    from mst_compile.ops import linear_ce as mod

    torch.manual_seed(0)
    z, y = torch.randn(32, 100), torch.randint(0, 100, (32,))
    y[2] = -100
    for n in (32, 17):
        zc = z[:n].clone()
        loss, g = mod.compiled_cross_entropy(zc, y[:n], -100, eps, True)
        ref_loss, ref_g = mod.fused_cross_entropy(z[:n].clone(), y[:n], -100, eps, True)
        assert g.data_ptr() == zc.data_ptr()
        torch.testing.assert_close(loss, ref_loss)
        torch.testing.assert_close(g, ref_g)
    assert registry._COMPILED[mod.ce_key(z, y, -100, eps)] is not None


def test_every_chunk_writes_its_logits_into_one_buffer():
    """The fused path's ``[chunk, vocab]`` logits live in one buffer for the whole loop (a fresh one per chunk
    maps fresh pages on the CPU each time): the op makes one tensor of that size, not one per chunk."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mst_compile import _compat
    from mst_compile.ops import linear_ce

    class Fresh(TorchDispatchMode):
        sizes: list

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            ins = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                   if isinstance(a, torch.Tensor)}  # fmt: skip
            self.sizes += [o.numel() for o in torch.utils._pytree.tree_leaves(out)
                           if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in ins]  # fmt: skip
            return out

    hs, w, b, y = _case(n=40, v=50)
    m = Fresh()
    m.sizes = []
    with m:  # the op's kernel itself, below its dispatch (the mode sees each aten op inside the loop)
        _compat.custom_op_kernel(linear_ce.linear_ce)(hs.detach(), w.detach(), b.detach(), y,
                                                      _spec(F64, F64, chunks=Chunks(4)))  # fmt: skip
    assert sum(n == 10 * 50 for n in m.sizes) == 1, m.sizes


def _softcap_fp32(z):
    return (torch.tanh(z / 30.0) * 30.0).float()


@pytest.mark.parametrize("want_logits", [False, True], ids=["loss", "loss+logits"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_a_compiled_tail_matches_op_by_op_and_compiles_once(want_logits, eps):
    """NOTE [compiled bodies], a head with a row-wise tail (softcap): the tail, the loss and their gradient as
    Inductor code, one compile for full and ragged chunks (301 rows in 3 chunks), the values op by op's (fp32),
    the logits returned as op by op returns them."""
    from torch.profiler import ProfilerActivity, profile

    from mst_compile.ops import linear_ce as mod

    torch.manual_seed(0)
    n, h, v = 301, 32, 1000
    x, w = torch.randn(n, h), torch.randn(v, h) * 0.5
    y = torch.randint(0, v, (n,))
    y[:20] = -100
    gm = torch.fx.symbolic_trace(_softcap_fp32)
    posts = [registry.register("post", gm, v, torch.float32, compiled=c) for c in (False, True)]
    specs = [_spec(F32, post, label_smoothing=eps, chunks=Chunks(3), needs=(True, True, False),
                   want_logits=want_logits) for post in posts]  # fmt: skip
    before = len(registry._COMPILED)
    ref = torch.ops.mst.linear_ce(x, w, None, y, specs[0])
    assert len(registry._COMPILED) == before  # op by op
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = torch.ops.mst.linear_ce(x, w, None, y, specs[1])
    assert len(registry._COMPILED) == before + 1  # one compile for the chunks of 101, 100, 100 rows
    assert any("CompiledFxGraph" in e.name for e in prof.events())
    for i in (0, 2, 3) + ((5,) if want_logits else ()):  # loss, dh, dw, the logits (fp32: the fusion's order)
        assert_close_rel(got[i], ref[i], rtol=1e-5, name=str(i))
    key = next(k for k in mod._TAILS if k[2:] == (-100, eps, want_logits))
    compiled = [fn for k, fn in registry._COMPILED.items() if k[:2] == ("tail", mod._TAILS[key].code)]
    assert compiled and None not in compiled


def test_a_tail_that_does_not_compile_runs_op_by_op(monkeypatch, caplog):
    """A compile failure of a tail is a missed fusion: one warning, the op-by-op values."""
    from mst_compile import _compat

    def broken(*a, **k):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(_compat, "compile_fx_rows_dynamic", broken)
    torch.manual_seed(1)
    x, w, y = torch.randn(40, 8), torch.randn(60, 8), torch.randint(0, 60, (40,))
    gm = torch.fx.symbolic_trace(lambda z: (torch.tanh(z / 7.0) * 7.0).float())  # a tail of its own: not cached
    specs = [_spec(F32, registry.register("post", gm, 60, torch.float32, compiled=c), chunks=Chunks(2),
                   needs=(True, True, False)) for c in (False, True)]  # fmt: skip
    ref = torch.ops.mst.linear_ce(x, w, None, y, specs[0])
    with caplog.at_level("WARNING", logger="mst_compile"):
        got = torch.ops.mst.linear_ce(x, w, None, y, specs[1])
    assert "could not be compiled" in caplog.text
    from mst_compile.report import counters

    assert counters["bodies_not_compiled"] >= 1  # what the GPU check reports
    for i in (0, 2, 3):
        torch.testing.assert_close(got[i], ref[i])
