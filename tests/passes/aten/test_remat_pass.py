"""The second-recompute pass on backward graphs (NOTE [second recompute]) and the checkpointed-region outputs
rule of the recompute pass (NOTE [checkpointed region outputs]).

Backward graphs come from AOTAutograd with the selective-recompute tags (no Inductor, no kernel): which values
cross the attention backward before and after the pass, that the gradients do not change, and what is left
alone. Then a checkpointed block under Dynamo: the region's output is saved, not recomputed with the region.
"""

import pytest
import torch
from functorch.compile import aot_function, make_boxed_func, min_cut_rematerialization_partition
from torch.utils.checkpoint import CheckpointPolicy, checkpoint

import mst_compile
from mst_compile.passes.aten.ops import is_big_backward_op
from mst_compile.passes.aten.recompute import tag_recompute
from mst_compile.passes.aten.remat import _Lifetimes, remat_across_barriers

from tests.conftest import assert_close_rel
from tests.passes.aten.test_recompute_pass import H, T, _inputs, _norm, attention_block


def _crossing(graph):
    """Big (``T x H``) values computed before an attention backward and read after it, not its own inputs."""
    life = _Lifetimes(graph)
    out = set()
    for b in (n for n in life.nodes if is_big_backward_op(n)):
        inputs = {life.owner[a] for a in b.all_input_nodes}
        for o in set(life.owner.values()):
            if (o.op == "call_function" and o not in inputs and life.pos[o] < life.pos[b] < life.last.get(o, -1)
                    and isinstance(o.meta.get("val"), torch.Tensor) and o.meta["val"].numel() >= T * H):  # fmt: skip
                out.add(o.name)
    return out


def _run(fn, args, remat: bool):
    """``fn`` through AOTAutograd with the recompute tags; the pass on the backward graph if ``remat``:
    ``(values crossing before, crossing after, clones made, gradients)``."""
    seen = {}

    def partition(joint, joint_inputs, **kw):
        tag_recompute(joint.graph, "attention")
        return min_cut_rematerialization_partition(joint, joint_inputs, **kw)

    def bw(gm, _):
        seen["before"] = _crossing(gm.graph)
        seen["cloned"] = remat_across_barriers(gm.graph) if remat else 0
        gm.recompile()
        seen["after"] = _crossing(gm.graph)
        return make_boxed_func(gm)

    leaves = [a for a in args if a.requires_grad]
    for a in leaves:
        a.grad = None
    aot_function(fn, fw_compiler=lambda gm, _: make_boxed_func(gm), bw_compiler=bw, partition_fn=partition)(
        *args
    ).sum().backward()
    return seen["before"], seen["after"], seen["cloned"], [a.grad.clone() for a in leaves]


def test_norm_output_is_recomputed_again_after_the_attention_backward():
    args = _inputs(4)
    before, after, cloned, got = _run(attention_block, args, remat=True)
    # the norm output (and the normalized x) are read to recompute q, k, v and again by the weight gradients
    assert before and cloned >= 1, before
    assert not after, after
    ref = _run(attention_block, args, remat=False)[3]
    for g, r in zip(got, ref):
        assert_close_rel(g, r, rtol=1e-5)


_SDPA_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def _backward_graph(body):
    """A hand-made backward graph: ``primals_1`` (a forward input, ``[T, H]``), ``saved`` (a saved activation),
    the attention backward's inputs, and ``body(primals_1, saved, attention_backward) -> output``."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def fn(primals_1, saved, tangents_1, q, k, v, out, lse):
        return body(primals_1, saved, lambda: _SDPA_BWD(tangents_1, q, k, v, out, lse, 0.0, True))

    q, k, v = (torch.randn(1, 4, T, H // 4) for _ in range(3))
    args = [torch.randn(T, H), torch.randn(T, H), torch.randn(1, 4, T, H // 4), q, k, v]
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(q, k, v, 0.0, True)[:2]
    gm = make_fx(fn)(*args[:3], q, k, v, o, lse)
    return gm, [*args[:3], q, k, v, o, lse]


def _cheap(x, saved, attention_backward):
    m = x * 2.0  # from a forward input: rebuilt after the attention backward
    dq = attention_backward()[0]
    return dq.sum() + (m * saved).sum()


def _expensive(x, saved, attention_backward):
    m = x.cumsum(0)  # a scan is not repeated
    dq = attention_backward()[0]
    return dq.sum() + (m * saved).sum()


def _extends(x, saved, attention_backward):
    s = saved.sin()  # T x H, last read before the attention backward
    m = s * 2.0  # rebuilding m after it would keep s alive instead
    t = s.sum()
    dq = attention_backward()[0]
    return dq.sum() + (m * x).sum() + t


def _in_place(x, saved, attention_backward):
    m = x * 2.0
    m.add_(1.0)  # an in-place op is never repeated
    dq = attention_backward()[0]
    return dq.sum() + (m * saved).sum()


@pytest.mark.parametrize("body, cloned", [(_cheap, 1), (_expensive, 0), (_extends, 0), (_in_place, 0)])
def test_what_is_cloned_past_the_attention_backward(body, cloned):
    gm, args = _backward_graph(body)
    ref = gm(*args)
    assert _crossing(gm.graph), gm.graph
    assert remat_across_barriers(gm.graph) == cloned
    gm.recompile()
    assert bool(_crossing(gm.graph)) == (cloned == 0)
    assert_close_rel(gm(*args), ref, rtol=1e-6)


def test_forward_graphs_are_untouched():
    gm = torch.fx.symbolic_trace(lambda x, w: _norm(x, w) @ w)
    assert remat_across_barriers(gm.graph) == 0


# ---- NOTE [checkpointed region outputs] -------------------------------------------------------------------


def _layer(x, w1, w2):
    return x + torch.relu(x @ w1) @ w2


def _checkpointed_then_norm(x, w1, w2, wn, wh):
    y = checkpoint(_layer, x, w1, w2, use_reentrant=False)
    return _norm(y, wn) @ wh


@pytest.mark.parametrize("fix", [True, False])
def test_checkpointed_region_output_read_outside_is_saved(fix, monkeypatch):
    """The region's output feeds a norm outside every region: saved, as eager checkpointing would (the norm
    saves its input), instead of recomputing the whole region before the norm's backward. ``fix=False`` runs
    the same graph without the rule: the output is then recomputed (the test can fail)."""
    from torch._dynamo.backends.common import aot_autograd

    import mst_compile.passes.aten.recompute as rc

    if not fix:
        monkeypatch.setattr(rc, "_save_region_outputs", lambda joint, tags: 0)
    seen = {}

    def partition(joint, joint_inputs, **kw):
        tag_recompute(joint.graph, "norms")
        seen["policies"] = {n.name: n.meta.get("recompute") for n in joint.graph.nodes}
        fw, bw = min_cut_rematerialization_partition(joint, joint_inputs, **kw)
        seen["bw_mms"] = sum(n.target is torch.ops.aten.mm.default for n in bw.graph.nodes)
        return fw, bw

    g = torch.Generator().manual_seed(8)
    x = torch.randn(T, H, generator=g, requires_grad=True)
    w1, w2, wh = ((torch.randn(H, H, generator=g) / H**0.5).requires_grad_() for _ in range(3))
    wn = torch.randn(H, generator=g).requires_grad_()
    args = [x, w1, w2, wn, wh]
    torch._dynamo.reset()
    mst_compile.reset_counters()
    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm), partition_fn=partition)
    torch.compile(_checkpointed_then_norm, backend=backend, fullgraph=True)(*args).sum().backward()
    got = [a.grad.clone() for a in args]
    for a in args:
        a.grad = None
    _checkpointed_then_norm(*args).sum().backward()
    for a, r in zip(got, [a.grad for a in args]):
        assert_close_rel(a, r, rtol=1e-5)
    saved = [n for n, p in seen["policies"].items() if p == CheckpointPolicy.MUST_SAVE]
    # backward: the layer's 4 matmul gradients + the head's 2, and the relu's input again (one more) when the
    # output is saved; recomputing the output repeats both layer matmuls
    if fix:
        assert len(saved) == 1 and mst_compile.counters["checkpoint_outputs_saved"] == 1, saved
        assert seen["bw_mms"] == 7, seen["bw_mms"]
    else:
        assert not saved and seen["bw_mms"] == 8, (saved, seen["bw_mms"])


@pytest.mark.slow
def test_end_to_end_with_hf_checkpointing_matches_eager(trace_checkpoints):
    """A tiny Llama with HF gradient checkpointing under the backend and Inductor: the last layer's output is
    saved, values are recomputed again in backward, and the gradients are eager's."""
    from mst_compile.bench.models import build_llama, token_batch

    from tests.conftest import grads

    model = build_llama("llama-tiny").float()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trace_checkpoints(model)  # NOTE [checkpointed layer tracing]
    ids = token_batch(256, model.config.vocab_size)
    model(input_ids=ids, labels=ids).loss.backward()
    ref = grads(model)
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    mst_compile.reset_counters()
    with torch._inductor.config.patch(force_disable_caches=True):
        torch.compile(lambda i: model(input_ids=i, labels=i).loss, backend="mst", options={"num_chunks": 2})(ids).backward()
    assert mst_compile.counters["checkpoint_outputs_saved"] == 1  # the last layer's output (the norm reads it)
    assert mst_compile.counters["values_recomputed_again"] >= 2  # at least one per layer
    for name, g in grads(model).items():
        assert_close_rel(g, ref[name], name=name)


def _layers_backward_graph(layers: int):
    """The backward graph (recompute tags applied) of ``layers`` attention blocks, each with its own weights."""
    x, wn, wq, wk, wv, wo, cos, sin = _inputs(0)
    ws = [w.detach().clone().requires_grad_() for _ in range(layers) for w in (wn, wq, wk, wv, wo)]
    seen = {}

    def fn(x, cos, sin, *ws):
        for i in range(layers):
            x = attention_block(x, *ws[5 * i : 5 * i + 5], cos, sin)
        return x

    def partition(joint, joint_inputs, **kw):
        tag_recompute(joint.graph, "attention")
        return min_cut_rematerialization_partition(joint, joint_inputs, **kw)

    def bw(gm, _):
        seen["graph"] = gm.graph
        return make_boxed_func(gm)

    aot_function(fn, fw_compiler=lambda gm, _: make_boxed_func(gm), bw_compiler=bw, partition_fn=partition)(
        x, cos, sin, *ws
    ).sum().backward()
    return seen["graph"]


def test_work_grows_at_most_quadratically_with_the_layers(monkeypatch):
    """NOTE [remat cost]: the weight gradients made before each attention backward cross every later one and
    are retried there one by one; each retry must not scan the rest of the graph (that made the pass cubic in
    the layer count: 16 Gemma-3 layers took seconds). Counted, not timed: the node input lists the pass reads
    outside the one lifetime table it builds per big op."""
    from torch import fx

    import mst_compile.passes.aten.remat as remat

    prop, reads = fx.Node.all_input_nodes, [0]
    counting = property(lambda n: (reads.__setitem__(0, reads[0] + 1), prop.fget(n))[1])

    class Uncounted(remat._Lifetimes):
        def __init__(self, graph):
            monkeypatch.setattr(fx.Node, "all_input_nodes", prop)
            super().__init__(graph)
            monkeypatch.setattr(fx.Node, "all_input_nodes", counting)

    monkeypatch.setattr(remat, "_Lifetimes", Uncounted)
    work = {}
    for layers in (4, 8):
        graph = _layers_backward_graph(layers)
        reads[0] = 0
        monkeypatch.setattr(fx.Node, "all_input_nodes", counting)
        cloned = remat_across_barriers(graph)
        monkeypatch.setattr(fx.Node, "all_input_nodes", prop)
        assert cloned == 2 * layers - 2, cloned  # the same rewrites at every depth
        work[layers] = reads[0]
    assert work[8] <= 5.5 * work[4], work  # quadratic: 4x per doubling (was 6.8x: a scan of the graph per retry)
