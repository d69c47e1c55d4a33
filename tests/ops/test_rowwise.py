import pytest
import torch
import torch.nn.functional as F

import mst_compile
from mst_compile.ops import registry
from tests.conftest import assert_close_rel, rowwise_spec


def swiglu(x, wg, wu, wd):
    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


KEY = registry.register_fn("test", "swiglu", swiglu, 6, None)
# the same MLP with the down projection applied by the op itself (NOTE [exit projection])
EXIT_KEY = registry.register_fn(
    "test", "swiglu-exit", lambda x, wg, wu, wd: F.silu(F.linear(x, wg)) * F.linear(x, wu), 6, None, exit_w=2
)


def _params(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*s, generator=g, dtype=dtype, requires_grad=True) for s in [(20, 6), (20, 6), (6, 20)]]


@pytest.mark.parametrize("key", [KEY, EXIT_KEY], ids=["generic", "exit-projection"])
def test_gradcheck_ragged_chunks(key):
    x = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    ps = _params()
    for m in (1, 3, 4, 11, 20):  # ragged, one row per chunk, more chunks than rows
        spec = rowwise_spec(key, m)
        assert torch.autograd.gradcheck(lambda x, *p: torch.ops.mst.rowwise(x, list(p), spec), (x, *ps))


def test_exit_projection_with_bias_and_frozen_weight():
    key = registry.register_fn(
        "test", "plain-exit-bias", lambda x, w1, b1, w2, b2: F.gelu(F.linear(x, w1, b1)), 6, None, exit_w=2, exit_b=3
    )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 6, dtype=torch.float64, generator=g, requires_grad=True)
    ps = [torch.randn(*s, dtype=torch.float64, generator=g, requires_grad=True) for s in [(20, 6), (20,), (6, 20), (6,)]]
    ps[2].requires_grad_(False)
    spec = rowwise_spec(key, 4)
    assert torch.autograd.gradcheck(lambda x, a, b, d: torch.ops.mst.rowwise(x, [a, b, ps[2], d], spec),
                                    (x, ps[0], ps[1], ps[3]))  # fmt: skip


def test_matches_unchunked_and_frozen_params():
    x = torch.randn(37, 6, dtype=torch.float64, requires_grad=True)
    ps = _params()
    ps[1].requires_grad_(False)  # frozen (LoRA-style) weight: no gradient computed for it
    ref = swiglu(x, *ps)
    ref.square().sum().backward()
    want = [x.grad.clone(), ps[0].grad.clone(), ps[2].grad.clone()]
    x.grad = ps[0].grad = ps[2].grad = None
    out = torch.ops.mst.rowwise(x, ps, rowwise_spec(KEY, 5))
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    for got, exp in zip([x.grad, ps[0].grad, ps[2].grad], want):
        torch.testing.assert_close(got, exp)
    assert ps[1].grad is None


def test_low_precision_weight_grad_accumulates_in_fp32():
    torch.manual_seed(0)
    x = torch.randn(512, 6, dtype=torch.bfloat16, requires_grad=True)
    ps = [p.detach().to(torch.bfloat16).requires_grad_() for p in _params()]
    torch.ops.mst.rowwise(x, ps, rowwise_spec(KEY, 64)).float().sum().backward()
    ref_ps = [p.detach().double().requires_grad_() for p in ps]
    swiglu(x.detach().double(), *ref_ps).sum().backward()
    for p, r in zip(ps, ref_ps):
        err = (p.grad.double() - r.grad).abs().max() / r.grad.abs().max()
        assert err < 2e-2, err  # bf16 output rounding only; 64 bf16 partial sums would drift further


def test_registered_bodies_hold_no_fake_values():
    """The registry outlives each compile: its bodies must not keep that compile's fake tensors alive."""
    from mst_compile.ops import registry
    from tests.modules import Block, PlainMLP

    torch.compile(Block(PlainMLP()), backend="mst", options={"compiler": "aot_eager", "num_chunks": 2})(torch.randn(2, 5, 16))
    assert mst_compile.counters["mlp_rewritten"] > 0
    bodies = [b.fn for b in registry._BODIES.values() if isinstance(b.fn, torch.fx.GraphModule)]
    assert bodies and all(not n.meta for gm in bodies for n in gm.graph.nodes)


def _swiglu_body(act=F.silu):
    g = torch.fx.Graph()
    x, wg, wu, wd = (g.placeholder(n) for n in ("x", "wg", "wu", "wd"))
    g.output(g.call_function(torch.mul, (g.call_function(act, (g.call_function(F.linear, (x, wg)),)),
                                         g.call_function(F.linear, (x, wu)))))  # fmt: skip
    return torch.fx.GraphModule(torch.nn.Module(), g)


def _rowwise_step(key, rows, chunks):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 16, generator=gen, requires_grad=True)
    ps = [torch.randn(48, 16, generator=gen).requires_grad_(), torch.randn(48, 16, generator=gen).requires_grad_(),
          torch.randn(16, 48, generator=gen).requires_grad_()]  # fmt: skip
    out = torch.ops.mst.rowwise(x, ps, rowwise_spec(key, chunks))
    return [out.detach()] + list(torch.autograd.grad(out.square().sum(), [x, *ps]))


@pytest.mark.slow
def test_compiled_bodies_match_op_by_op_and_compile_once(monkeypatch):
    """NOTE [compiled bodies]: one Inductor compile per grad mode, shared by chunk sizes (the row count is a
    symbol) and by every region with the same body."""
    eager = registry.register("mlp", _swiglu_body(), 16, torch.float32, exit_w=2)
    fused = registry.register("mlp", _swiglu_body(), 16, torch.float32, exit_w=2, compiled=True)
    again = registry.register("mlp", _swiglu_body(), 16, torch.float32, exit_w=2, compiled=True)
    assert fused == again and fused != eager
    monkeypatch.setattr(registry, "_COMPILED", {})
    # a cache hit would skip the passes that annotate; config.patch, not monkeypatch: undoing a monkeypatch of
    # the config module deletes the option for every later test of the process
    with torch._inductor.config.patch(fx_graph_cache=False):
        for rows, chunks in ((37, 3), (64, 4), (9, 2)):
            for a, b in zip(_rowwise_step(fused, rows, chunks), _rowwise_step(eager, rows, chunks)):
                assert_close_rel(a, b, rtol=1e-5)  # Inductor's fused kernel rounds differently in the last bits
    assert len(registry._COMPILED) == 2  # forward (no grad) and the backward's recompute (grad)
    body = registry.get(fused).fn  # compile_fx annotates the graph it is given: the registry's copy stays bare
    assert not any(n.meta for n in body.graph.nodes)


@pytest.mark.slow
def test_a_body_never_makes_a_cuda_graph_of_its_own():
    """A body runs inside the caller's compiled code, maybe inside its CUDA graph capture: it compiles with CUDA
    graphs off even when the process turned them on for everything. On the CPU a requested graph is skipped, and
    Inductor counts the skip: none is counted."""
    from torch._dynamo.utils import counters as torch_counters

    gm = torch.fx.symbolic_trace(lambda x: torch.nn.functional.silu(x) * 2)
    x = torch.randn(6, 8)
    skips = torch_counters["inductor"]["cudagraph_skips"]
    with torch._inductor.config.patch({"triton.cudagraphs": True, "fx_graph_cache": False}):
        fn = registry.compile_body(gm, [x], rows_args=(0,))
    assert torch_counters["inductor"]["cudagraph_skips"] == skips
    torch.testing.assert_close(fn(x), gm(x))


def test_a_body_that_does_not_compile_runs_op_by_op(monkeypatch, caplog):
    from mst_compile import _compat

    def broken(*a):
        raise RuntimeError("injected compile failure")

    monkeypatch.setattr(_compat, "compile_fx_rows_dynamic", broken)
    monkeypatch.setattr(registry, "_COMPILED", {})
    fused = registry.register("mlp", _swiglu_body(F.gelu), 16, torch.float32, exit_w=2, compiled=True)
    eager = registry.register("mlp", _swiglu_body(F.gelu), 16, torch.float32, exit_w=2)
    with caplog.at_level("WARNING", logger="mst_compile"):
        got = _rowwise_step(fused, 20, 2)
    for a, b in zip(got, _rowwise_step(eager, 20, 2)):
        torch.testing.assert_close(a, b)  # the same op-by-op code
    assert "could not be compiled" in caplog.text
    from mst_compile.report import counters

    assert counters["bodies_not_compiled"] >= 1  # what the GPU check reports


def _weight_casts(fn, params) -> int:
    """How many fp32 -> bf16 casts of a tensor shaped as one of ``params`` ``fn()`` makes (the profiler sees the
    ops inside the chunked op; the test's other tensors have other shapes)."""
    from torch.profiler import ProfilerActivity, profile

    shapes = [list(p.shape) for p in params]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    bf16 = 15  # the ScalarType code of torch.bfloat16 in the profiler's concrete inputs
    return sum(1 for e in prof.events() if e.name == "aten::_to_copy" and list(e.input_shapes[0]) in shapes
               and e.concrete_inputs[1] == bf16)  # fmt: skip


@pytest.mark.parametrize("key", ["generic", "exit-projection"])
def test_autocast_casts_each_weight_once_per_call_not_per_chunk(key):
    # NOTE [one cast per call]: a region that ran under autocast with fp32 weights, its autocast traced into the
    # graph (no autocast around the op at run time): each weight is cast once in the forward and once in the
    # backward, whatever the chunk count
    fn = swiglu if key == "generic" else (lambda x, wg, wu, wd: F.silu(F.linear(x, wg)) * F.linear(x, wu))
    k = registry.register_fn("test", f"swiglu-amp-{key}", fn, 6, None, exit_w=-1 if key == "generic" else 2,
                             autocast=("cpu", torch.bfloat16))  # fmt: skip
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(4), requires_grad=True)
    ps = [p.detach().float().requires_grad_() for p in _params()]
    spec = rowwise_spec(k, 8)
    out = []
    assert _weight_casts(lambda: out.append(torch.ops.mst.rowwise(x, ps, spec)), ps) == 3
    assert _weight_casts(lambda: out[0].float().sum().backward(), ps) == 3
    with torch.autocast("cpu", torch.bfloat16):
        ref = fn(x, *ps)
        if key != "generic":
            ref = F.linear(ref, ps[2])
    assert_close_rel(out[0].float(), ref.float(), rtol=1e-2)


def _counting_compiles(monkeypatch) -> list:
    """Compiles recorded, not run: each body's graph stands for its compiled code (no C++ compile)."""
    from mst_compile import _compat

    made = []

    def compile_fx_rows_dynamic(gm, args, rows_args=(0,)):
        made.append([a.requires_grad for a in args])
        return gm

    monkeypatch.setattr(_compat, "compile_fx_rows_dynamic", compile_fx_rows_dynamic)
    monkeypatch.setattr(registry, "_COMPILED", {})
    return made


def test_a_forward_compiles_once_whether_or_not_its_weights_need_a_gradient(monkeypatch):
    """A forward runs without grad mode: whether its inputs need a gradient does not change its code, so it does
    not change its key either. Under CUDA graphs the weights a forward records with can be copies that need none
    (NOTE [no compile in a capture]): a key with them would compile again inside the capture."""
    made = _counting_compiles(monkeypatch)
    fused = registry.register("mlp", _swiglu_body(), 16, torch.float32, exit_w=2, compiled=True)
    x = torch.randn(12, 16)
    ps = [torch.randn(48, 16).requires_grad_(), torch.randn(48, 16).requires_grad_(), torch.randn(16, 48)]
    outs = [torch.ops.mst.rowwise(x, list(p), rowwise_spec(fused, 3)) for p in (ps, [p.detach() for p in ps])]
    torch.testing.assert_close(outs[0], outs[1])
    assert len(made) == 1, made


def test_a_body_first_met_inside_a_cuda_graph_capture_runs_op_by_op(monkeypatch):
    """NOTE [no compile in a capture]: no compile while a capture runs; that call runs op by op and says so, and
    the body compiles at its next call outside the capture."""
    from mst_compile.report import counters

    made = _counting_compiles(monkeypatch)
    fused = registry.register("mlp", _swiglu_body(), 16, torch.float32, exit_w=2, compiled=True)
    eager = registry.register("mlp", _swiglu_body(), 16, torch.float32, exit_w=2)
    before = counters["bodies_not_compiled"]
    monkeypatch.setattr(registry, "_capturing", lambda: True)
    ref = _rowwise_step(eager, 20, 2)
    for a, b in zip(_rowwise_step(fused, 20, 2), ref):
        torch.testing.assert_close(a, b)
    assert made == [] and not registry._COMPILED and counters["bodies_not_compiled"] == before + 4  # each chunk, fwd and bwd
    monkeypatch.setattr(registry, "_capturing", lambda: False)
    _rowwise_step(fused, 20, 2)
    assert len(made) == 2 and all(registry._COMPILED.values())
