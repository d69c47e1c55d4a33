import pytest
import torch

import mst_compile
from mst_compile.ops.chunking import Chunks
from mst_compile.ops.spec import RowwiseSpec
from mst_compile.passes import PassContext, run_passes


@pytest.fixture(autouse=True)
def _fresh():
    mst_compile.reset_counters()
    torch._dynamo.reset()
    yield


@pytest.fixture
def trace_checkpoints():
    """``trace_checkpoints(model)``: the recipe for checkpointed HF layers (NOTE [checkpointed layer tracing]),
    its process-wide Dynamo setting put back after the test."""
    with mst_compile._compat.dynamo_config().patch(skip_fwd_side_effects_in_bwd_under_checkpoint=False):
        yield mst_compile.recipes.trace_checkpointed_layers


def dynamo_graph(fn, *args, **kwargs):
    """The FX graph (and example inputs) Dynamo hands a backend for ``fn(*args, **kwargs)``."""
    captured = []

    def capture(gm, example_inputs):
        captured.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, fullgraph=False)(*args, **kwargs)
    assert len(captured) == 1, f"expected one graph, got {len(captured)}"
    return captured[0]


#: the automatic chunk count with no minimum chunk size: test-sized regions still get several chunks (the real
#: minimum makes them one, and one chunk is left whole: NOTE [one chunk is whole])
SMALL = mst_compile.MSTConfig(min_chunk_tokens=1)


def rewrite(fn, *args, config=None, **kwargs):
    """Run the mst passes on ``fn``'s Dynamo graph (no Inductor): ``(rewritten gm, PassContext)``; ``config``
    defaults to ``SMALL``."""
    gm, example_inputs = dynamo_graph(fn, *args, **kwargs)
    ctx = PassContext(config or SMALL, torch.is_grad_enabled())
    return run_passes(gm, ctx), ctx, example_inputs


def rowwise_spec(key: str, num_chunks: int, chunk_rows: int = 0) -> str:
    """The ``mst::rowwise`` spec string of body ``key`` in that chunk plan (NOTE [body spec])."""
    return RowwiseSpec(key, Chunks(num_chunks, chunk_rows)).dumps()


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5, name: str = "", atol: float = 1e-8):
    """``|a - b|_max <= rtol * |b|_max + atol`` (relative to the reference's scale; ``atol`` only matters for
    gradients that are zero in exact arithmetic, such as a key-projection bias under softmax)."""
    err = (a.detach().double() - b.detach().double()).abs().max().item()
    scale = b.detach().double().abs().max().item()
    assert err <= rtol * scale + atol, f"{name}: max abs err {err:.3e} > {rtol} * {scale:.3e} + {atol}"


def assert_matches_eager(gm, example_inputs, module, x, upstream):
    """The rewritten graph's output and its gradients w.r.t. ``x`` and every parameter of ``module`` (for the
    same ``upstream`` gradient) equal eager's, relative to the reference's scale."""
    wrt = [x, *module.parameters()]
    ref = module(x)
    ref_grads = torch.autograd.grad(ref, wrt, upstream)
    out = gm(*example_inputs)[0]
    got = torch.autograd.grad(out, wrt, upstream)
    assert_close_rel(out, ref, name="out")
    for g, r in zip(got, ref_grads):
        assert_close_rel(g, r)


def grads(module: torch.nn.Module) -> dict:
    return {n.replace("_orig_mod.", ""): p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def regions(ctx, kind: str, status: str | None = None) -> list:
    """The regions of one kind ("mlp", "head") a pass run recorded, optionally of one status."""
    return [r for r in ctx.regions if r.kind == kind and (status is None or r.status == status)]


def calls(gm, name: str) -> list:
    """The nodes of ``gm`` that call the op ``torch.ops.mst.<name>`` (``rowwise``, ``linear_ce``) or the
    function named ``name``."""
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and name in (getattr(n.target, "__name__", ""), getattr(n.target, "_opname", ""))]  # fmt: skip
