"""NOTE [entry projections]: the split on traced bodies, and the backward that issues the projections' GEMMs."""

import pytest
import torch
import torch.nn.functional as F

import mst_compile  # noqa: F401
from mst_compile.ops import entry, registry
from tests.conftest import rowwise_spec


def _swiglu(x, wg, wu, wd):
    return F.silu(F.linear(x, wg)) * F.linear(x, wu)


def _fused_gate_up(x, w, b, wd):
    gate, up = F.linear(x, w, b).chunk(2, dim=-1)
    return F.silu(gate) * up


def _residual(x, wg, wu, wd):
    return F.silu(F.linear(x, wg)) * F.linear(x, wu) + x.sum(-1, keepdim=True)


def _shared(x, w, wu, wd):
    return F.silu(F.linear(x, w)) * F.linear(x, w)


def _weight_in_middle(x, wg, wu, wd):
    return F.silu(F.linear(x, wg)) * F.linear(x, wu) * wg.sum()


def test_swiglu_splits_at_its_two_projections():
    e = entry.split(torch.fx.symbolic_trace(_swiglu))
    assert (e.weights, e.biases, e.owned()) == ((0, 1), (-1, -1), {0, 1})
    code = e.middle.code
    assert "linear" not in code and "silu" in code
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    torch.testing.assert_close(e.middle(a, b, None, None, None), F.silu(a) * b)


def test_a_fused_gate_up_with_bias_is_one_projection():
    e = entry.split(torch.fx.symbolic_trace(_fused_gate_up))
    assert (e.weights, e.biases, e.owned()) == ((0,), (1,), {0, 1})


@pytest.mark.parametrize("fn", [_residual, _shared, _weight_in_middle], ids=["x-read-elsewhere", "one-weight-twice",
                                                                             "weight-read-in-the-middle"])
def test_bodies_of_other_shapes_do_not_split(fn):
    assert entry.split(torch.fx.symbolic_trace(fn)) is None


def _params(shapes, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=dtype, requires_grad=True) for s in shapes]


def test_gradcheck_through_the_split_with_ragged_chunks():
    key = registry.register("mlp", torch.fx.symbolic_trace(_fused_gate_up), 6, None, exit_w=2)
    assert registry.get(key).entries is not None  # this body takes the split path
    x = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    ps = _params([(40, 6), (40,), (6, 20)])
    for m in (1, 3, 11):
        spec = rowwise_spec(key, m)
        assert torch.autograd.gradcheck(lambda x, *p: torch.ops.mst.rowwise(x, list(p), spec), (x, *ps))


@pytest.mark.parametrize("frozen", ["x", "gate", "gate+up", "down"])
def test_any_subset_of_gradients_matches_autograd(frozen):
    key = registry.register("mlp", torch.fx.symbolic_trace(_swiglu), 6, None, exit_w=2)
    x = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    ps = _params([(20, 6), (20, 6), (6, 20)], seed=1)
    off = {"x": [x], "gate": [ps[0]], "gate+up": ps[:2], "down": [ps[2]]}[frozen]
    for t in off:
        t.requires_grad_(False)
    live = [t for t in [x, *ps] if t.requires_grad]
    ref = F.linear(_swiglu(x, *ps), ps[2])
    want = torch.autograd.grad(ref.square().sum(), live)
    got = torch.autograd.grad(torch.ops.mst.rowwise(x, ps, rowwise_spec(key, 4)).square().sum(), live)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_the_split_runs_in_one_dtype_or_the_autocast_dtype():
    e = entry.split(torch.fx.symbolic_trace(_swiglu))
    bf = [torch.empty(4, 2, dtype=torch.bfloat16)] * 3
    assert entry.compute_dtype(e, torch.empty(3, 2, dtype=torch.bfloat16), bf, None) == torch.bfloat16
    assert entry.compute_dtype(e, torch.empty(3, 2), bf, None) is None  # fp32 input, bf16 weights: autograd's rules
    fp32 = [torch.empty(4, 2)] * 3
    assert entry.compute_dtype(e, torch.empty(3, 2), fp32, ("cpu", torch.bfloat16)) == torch.bfloat16
    assert entry.compute_dtype(e, torch.empty(3, 2, dtype=torch.float64), fp32, ("cpu", torch.bfloat16)) is None
    assert entry.compute_dtype(e, torch.empty(3, 2), fp32, ("cuda", torch.bfloat16)) is None  # another device
    assert entry.compute_dtype(None, torch.empty(3, 2), [], None) is None


@pytest.mark.parametrize("body", [_swiglu, _fused_gate_up], ids=["swiglu", "fused-gate-up-bias"])
def test_under_autocast_the_split_runs_in_the_autocast_dtype_as_autocast_does(body, monkeypatch):
    # fp32 weights, the region under autocast: the op's GEMMs in bf16, weight gradients accumulated in fp32; no
    # further from the fp64 gradients than eager autocast is
    key = registry.register("mlp", torch.fx.symbolic_trace(body), 6, None, exit_w=2, autocast=("cpu", torch.bfloat16))
    shapes = [(20, 6), (20, 6), (6, 20)] if body is _swiglu else [(40, 6), (40,), (6, 20)]
    gen = torch.Generator().manual_seed(3)
    x, up = torch.randn(96, 6, generator=gen).requires_grad_(), torch.randn(96, 6, generator=gen)
    ps = [p.detach().float().requires_grad_() for p in _params(shapes, seed=2)]
    calls = []
    project = entry.project
    monkeypatch.setattr(entry, "project", lambda *a: calls.append(a[1].dtype) or project(*a))

    def run(fn, *args):
        return torch.autograd.grad(fn(*args).float().mul(up).sum(), [x, *ps])

    got = run(lambda: torch.ops.mst.rowwise(x, ps, rowwise_spec(key, 4)))
    assert calls == [torch.bfloat16] * 8  # the split, on bf16 chunks, in the forward and the recompute

    def eager(dtype=None):
        xs, pp = (x, ps) if dtype is None else (x.double(), [p.double() for p in ps])
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype is None):
            return F.linear(body(xs, *pp), pp[2])

    want, exact = run(eager), run(lambda: eager(torch.float64))
    for g, w, r in zip(got, want, exact):
        assert g.dtype == w.dtype == torch.float32
        err = lambda a: ((a.double() - r).abs().max() / r.abs().max()).item()  # noqa: E731
        # a floor of one bf16 rounding step (2**-7 relative): over 30 seeds, mst's error exceeded 1.25x eager's
        # by at most 0.004 (one rounding more or less in a partial sum)
        assert err(g) <= 1.25 * err(w) + 2**-7, (err(g), err(w))
