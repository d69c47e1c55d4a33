"""The selective-recompute joint-graph pass (NOTE [selective recompute]).

On joint graphs traced by AOTAutograd (no Inductor, no kernel): which forward nodes it tags, what the min-cut
partitioner then saves, and that the recomputed backward gives the same gradients. Then end to end on a tiny
Llama compiled by the backend with Inductor.
"""

import pytest
import torch
import torch.nn.functional as F
from functorch.compile import aot_function, make_boxed_func, min_cut_rematerialization_partition

import mst_compile
from mst_compile import _compat
from mst_compile.passes.aten.recompute import tag_recompute

from tests.conftest import assert_close_rel, grads

aten = torch.ops.aten
T, H, HEADS = 64, 32, 4
D = H // HEADS


def _norm(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def _rope(t, cos, sin):
    a, b = t[..., : D // 2], t[..., D // 2 :]
    return t * cos + torch.cat((-b, a), dim=-1) * sin


def attention_block(x, wn, wq, wk, wv, wo, cos, sin):
    """A pre-norm Llama attention block on ``[T, H]`` tokens, residual included."""
    n = _norm(x, wn)
    q, k, v = ((n @ w.t()).view(T, HEADS, D).transpose(0, 1)[None] for w in (wq, wk, wv))
    o = F.scaled_dot_product_attention(_rope(q, cos, sin), _rope(k, cos, sin), v, is_causal=True)
    return x + o[0].transpose(0, 1).reshape(T, H) @ wo.t()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g, requires_grad=True)
    ws = [torch.randn(H, generator=g).requires_grad_()] + [
        (torch.randn(H, H, generator=g) / H**0.5).requires_grad_() for _ in range(4)
    ]
    pos = torch.arange(T, dtype=torch.float32)[:, None] / 10 ** (torch.arange(D, dtype=torch.float32) / D)
    return [x, *ws, pos.cos(), pos.sin()]


def boxed(gm, _):
    return make_boxed_func(gm)


def gpt2_block(x, ln_w, ln_b, wqkv, wo):
    """A GPT-2 attention block: LayerNorm, one fused q/k/v projection split three ways, no RoPE."""
    n = F.layer_norm(x, (H,), ln_w, ln_b)
    q, k, v = ((t.view(T, HEADS, D).transpose(0, 1)[None]) for t in (n @ wqkv.t()).split(H, dim=-1))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return x + o[0].transpose(0, 1).reshape(T, H) @ wo.t()


def run(fn, mode, args, decompositions=None):
    """``fn`` through AOTAutograd with the pass before the min-cut partitioner: ``(tagged count, saved forward
    nodes that are not inputs, gradients of the tensor inputs, [(call target, its recompute tag) per node])``."""
    seen = {}

    def partition(joint, joint_inputs, **kw):
        seen["tagged"] = tag_recompute(joint.graph, mode)
        seen["tags"] = [(n.target, n.meta.get("recompute")) for n in joint.graph.nodes if n.op == "call_function"]
        fw, bw = min_cut_rematerialization_partition(joint, joint_inputs, **kw)
        outs = fw.graph.find_nodes(op="output")[0].args[0][kw["num_fwd_outputs"] :]
        seen["saved"] = [n for n in outs if n.op != "placeholder"]
        return fw, bw

    leaves = [a for a in args if a.requires_grad]
    for a in leaves:
        a.grad = None
    aot_function(fn, fw_compiler=boxed, bw_compiler=boxed, partition_fn=partition, decompositions=decompositions)(
        *args
    ).sum().backward()
    return seen["tagged"], seen["saved"], [a.grad.clone() for a in leaves], seen["tags"]


def _targets(saved):
    return [n.target for n in saved]


def _bytes(saved):
    return sum(n.meta["val"].numel() for n in saved if isinstance(n.meta.get("val"), torch.Tensor))


def test_attention_mode_recomputes_norm_and_qkv_and_keeps_gradients():
    args = _inputs()
    none_tagged, kept, ref, _ = run(attention_block, "none", args)
    assert none_tagged == 0
    tagged, saved, got, _ = run(attention_block, "attention", args)
    assert tagged > 0
    # the norm output and q, k, v (4 x [T, H]) are no longer kept; what backward reads is the block input, the
    # attention op's outputs and per-token statistics
    assert _bytes(saved) <= _bytes(kept) - 4 * T * H, (_targets(kept), _targets(saved))
    assert not any(n.meta.get("recompute") for n in saved)
    for g, r in zip(got, ref):
        assert_close_rel(g, r, rtol=1e-5)


def test_norms_mode_recomputes_only_the_norm_chain():
    args = _inputs(1)
    _, kept, ref, _ = run(attention_block, "none", args)
    tagged, saved, got, _ = run(attention_block, "norms", args)
    assert tagged > 0
    assert _bytes(saved) == _bytes(kept) - T * H, (_targets(kept), _targets(saved))  # the norm output only
    for g, r in zip(got, ref):
        assert_close_rel(g, r, rtol=1e-5)


def test_layer_norm_and_fused_qkv_projection_are_recomputed():
    """GPT-2's shape: a LayerNorm decomposed as Inductor decomposes it and q, k, v split out of one
    projection."""
    from torch._inductor.decomposition import select_decomp_table

    g = torch.Generator().manual_seed(9)
    x = torch.randn(T, H, generator=g, requires_grad=True)
    ln_w, ln_b = torch.randn(H, generator=g).requires_grad_(), torch.randn(H, generator=g).requires_grad_()
    wqkv = (torch.randn(3 * H, H, generator=g) / H**0.5).requires_grad_()
    wo = (torch.randn(H, H, generator=g) / H**0.5).requires_grad_()
    args, table = [x, ln_w, ln_b, wqkv, wo], select_decomp_table()
    _, kept, ref, _ = run(gpt2_block, "none", args, table)
    tagged, saved, got, tags = run(gpt2_block, "attention", args, table)
    assert any(t is torch.ops.aten.split.Tensor and p for t, p in tags), "the split is recomputed"
    # the LayerNorm output and the fused q/k/v projection (1 + 3 x [T, H]) are no longer kept
    assert _bytes(saved) <= _bytes(kept) - 4 * T * H, (_targets(kept), _targets(saved))
    for a, r in zip(got, ref):
        assert_close_rel(a, r, rtol=1e-5)


def _chain_from_unsaved_value(x, w1, w2):
    """``n`` could be recomputed, but only from ``u``, which backward does not read: tagging ``n`` would make
    the step keep ``u`` instead, no gain; the pass leaves it."""
    u = x @ w1
    return (u + 1.0) @ w2


def _value_used_outside(x, wn, w):
    """The norm output also feeds the residual: it is needed in forward outside the chain, so never tagged."""
    n = _norm(x, wn)
    return n @ w + n


def _random_chain(x, wn, w):
    return F.dropout(_norm(x, wn), p=0.5, training=True) @ w


def test_left_alone_unsaved_frontier_and_outside_users():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(T, H, generator=g, requires_grad=True)
    w1, w2 = (torch.randn(H, H, generator=g).requires_grad_() for _ in range(2))
    assert run(_chain_from_unsaved_value, "attention", [x, w1, w2])[0] == 0
    wn = torch.randn(H, generator=g).requires_grad_()
    tags = run(_value_used_outside, "attention", [x, wn, w1])[3]
    tagged = {t for t, policy in tags if policy}
    assert not {aten.mul.Tensor, aten.rsqrt.default, aten.add.Tensor} & tagged, tagged


def test_random_ops_are_never_tagged():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, H, generator=g, requires_grad=True)
    wn, w = torch.randn(H, generator=g).requires_grad_(), torch.randn(H, H, generator=g).requires_grad_()
    tags = run(_random_chain, "attention", [x, wn, w])[3]
    random = [p for t, p in tags if isinstance(t, _compat.OpOverload) and torch.Tag.nondeterministic_seeded in t.tags]
    assert random and all(p is None for p in random)


def test_inference_graph_is_untouched():
    gm = torch.fx.symbolic_trace(lambda x, w: _norm(x, w) @ w)
    assert tag_recompute(gm.graph, "attention") == 0
    assert not any("recompute" in n.meta for n in gm.graph.nodes)


@pytest.fixture(scope="module")
def tiny_llama_runs():
    """A tiny Llama's compiled step under the backend (Inductor, no cache so the joint pass runs) with
    ``recompute="none"`` and the default: counters, bytes saved for backward, gradients; and eager's gradients."""
    from mst_compile.bench.models import build_llama, token_batch

    model = build_llama("llama-tiny").float()
    ids = token_batch(256, model.config.vocab_size)
    model(input_ids=ids, labels=ids).loss.backward()
    out = {"eager": grads(model)}
    for mode in ("none", "attention"):
        model.zero_grad(set_to_none=True)
        torch._dynamo.reset()
        mst_compile.reset_counters()
        step = torch.compile(lambda i: model(input_ids=i, labels=i).loss, backend="mst", options={"recompute": mode, "num_chunks": 2})  # chunked: NOTE [untouched graphs]
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch._inductor.config.patch(force_disable_caches=True):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = step(ids)
            loss.backward()
        out[mode] = dict(counters=dict(mst_compile.counters), saved=sum(saved.values()), grads=grads(model))
    return out


@pytest.mark.slow
def test_end_to_end_tags_both_layers_and_matches_eager(tiny_llama_runs):
    runs = tiny_llama_runs
    assert runs["attention"]["counters"].get("attention_inputs_recomputed") == 2  # two layers
    assert "recompute_tagged" not in runs["none"]["counters"]
    for mode in ("none", "attention"):
        for name, g in runs[mode]["grads"].items():
            assert_close_rel(g, runs["eager"][name], name=f"{mode}:{name}")


@pytest.mark.slow
def test_end_to_end_saves_less(tiny_llama_runs):
    """Per layer the norm outputs and q, k, v (5 of H=64 fp32 per token, q and 2 GQA k/v heads smaller) are no
    longer kept: at 256 tokens at least 2 layers x (2 + 1 + 0.5 + 0.5) x 64 KiB fewer saved bytes."""
    none, att = tiny_llama_runs["none"]["saved"], tiny_llama_runs["attention"]["saved"]
    assert none - att >= 2 * 4 * 256 * 64 * 4, (none, att)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["norms", "attention"])
def test_gpt2_end_to_end(mode):
    """The zoo's GPT-2 under the backend and Inductor. ``norms``: its LayerNorm chains are tagged, which needs
    the joint graph's backward told apart by AOTAutograd's ``is_backward`` mark (the decomposed LayerNorm
    backward recomputes ``x - mean`` without reading a tangent, so by data flow alone it looked like forward
    and every chain failed the "read by backward anyway" rule). ``attention``: q, k, v come out of the fused
    projection's split. Gradients equal eager's."""
    from mst_compile.bench import zoo

    from tests.conftest import grads

    model = zoo.build("gpt2").float()
    ids = torch.randint(0, zoo.V, (1, 128), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    ref = grads(model)
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    mst_compile.reset_counters()
    step = torch.compile(lambda i: model(input_ids=i, labels=i).loss, backend="mst", options={"recompute": mode, "num_chunks": 2})  # chunked: NOTE [untouched graphs]
    with torch._inductor.config.patch(force_disable_caches=True):
        step(ids).backward()
    c = mst_compile.counters
    assert c["recompute_tagged"] > 0
    assert c["attention_inputs_recomputed"] == (zoo.L if mode == "attention" else 0)
    for name, g in grads(model).items():
        assert_close_rel(g, ref[name], name=name)


def _fused_qkv_with_a_side_read(x, wn, wqkv, wo):
    """torchtitan's shape: one q/k/v projection split unevenly (``split_with_sizes``, GQA), and one piece also
    read by a forward op outside the recomputed chain, so the split itself stays out of it."""
    kv = H // 2
    n = _norm(x, wn)
    q, k, v = (n @ wqkv.t()).split_with_sizes([H, kv, kv], dim=-1)
    side = k.amax()
    q = q.view(T, HEADS, D).transpose(0, 1)[None]
    k, v = (t.view(T, HEADS // 2, D).transpose(0, 1)[None].repeat_interleave(2, dim=1) for t in (k, v))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return x + o[0].transpose(0, 1).reshape(T, H) @ wo.t() + side


def test_a_piece_of_an_unrecomputed_split_is_not_tagged():
    """A tuple-valued node cannot be saved: tagging a piece without its split made the min-cut partitioner
    fail (and the backend fall back to plain Inductor)."""
    from torch._inductor.decomposition import select_decomp_table

    g = torch.Generator().manual_seed(9)
    x = torch.randn(T, H, generator=g, requires_grad=True)
    wn = torch.randn(H, generator=g).requires_grad_()
    wqkv = (torch.randn(2 * H, H, generator=g) / H**0.5).requires_grad_()
    wo = (torch.randn(H, H, generator=g) / H**0.5).requires_grad_()
    args, table = [x, wn, wqkv, wo], select_decomp_table()
    _, _, ref, _ = run(_fused_qkv_with_a_side_read, "none", args, table)
    tagged, _, got, tags = run(_fused_qkv_with_a_side_read, "attention", args, table)
    assert tagged > 0  # the norm chain still is
    assert not any(t is torch.ops.aten.split_with_sizes.default and p for t, p in tags)
    for a, r in zip(got, ref):
        assert_close_rel(a, r, rtol=1e-5)
