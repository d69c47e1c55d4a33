"""The regions found in a tiny HF Llama's Dynamo graph (no Inductor: the passes alone)."""

import torch

import mst_compile
from mst_compile.bench.models import build_llama
from tests.conftest import regions, rewrite


def _graph(**kw):
    model = build_llama("llama-tiny", hidden_size=32, intermediate_size=96, vocab_size=320, **kw)
    ids = torch.randint(0, 320, (2, 11))
    return model, ids


def _linears(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear]


def test_exact_regions_of_a_llama():
    model, ids = _graph()
    gm, ctx, ex = rewrite(lambda i: model(input_ids=i, labels=i), ids)
    mlps, heads = regions(ctx, "mlp"), regions(ctx, "head")
    assert [r.status for r in mlps] == ["rewritten", "rewritten"]
    assert [r.status for r in heads] == ["rewritten"]
    for r in mlps:  # gate, act, up, mul, down; nothing of attention or the norms
        assert len(r.nodes) == 5 and any("silu" in n for n in r.nodes)
    assert heads[0].nodes[-1] == "loss" and len(heads[0].nodes) == 4  # linear, float, view, cross_entropy
    # attention projections (q, k, v, o per layer) are untouched
    assert len(_linears(gm)) == 8
    out = gm(*ex)
    ref = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out[0], ref.loss)


def test_llama_without_labels_only_chunks_the_mlps():
    model, ids = _graph()
    _, ctx, _ = rewrite(lambda i: model(input_ids=i).logits, ids)
    assert [r.kind for r in ctx.regions if r.status == "rewritten" and r.kind != "mask"] == ["mlp", "mlp"]
    # the head projection widens too; it is considered and left alone with a reason
    (skipped,) = [r for r in ctx.regions if r.status == "skipped"]
    assert "graph output" in skipped.reason


def test_config_switches():
    model, ids = _graph()
    _, ctx, _ = rewrite(lambda i: model(input_ids=i, labels=i).loss, ids, config=mst_compile.MSTConfig(head=False, min_chunk_tokens=1))
    assert {r.kind for r in ctx.regions if r.status == "rewritten"} == {"mlp", "mask"}
    cfg = mst_compile.MSTConfig(head=False, causal_mask=False, min_chunk_tokens=1)
    _, ctx, _ = rewrite(lambda i: model(input_ids=i, labels=i).loss, ids, config=cfg)
    assert {r.kind for r in ctx.regions if r.status == "rewritten"} == {"mlp"}

