"""NOTE [tied embedding gradient]: the post-grad rewrite on traced aten graphs, then end to end on a tied model."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import mst_compile
from mst_compile.passes.aten.embedding_grad import accumulate_into_other_grad
from tests.conftest import assert_close_rel, grads

aten = torch.ops.aten
V, H, T = 50, 8, 12


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (T,), generator=g)
    ids[3] = ids[7]  # a repeated row: the scatter must accumulate
    mask = (ids != 4).unsqueeze(1)  # padding_idx 4: its rows masked out
    return torch.randn(V, H, generator=g), mask, ids, torch.randn(T, H, generator=g), torch.tensor(0.5)


def _traced(fn):
    return make_fx(fn, tracing_mode="fake")(*_inputs())


def _masked(g_head, mask, ids, rows, s):
    zeros = torch.full((V, H), 0.0)
    return g_head * s + aten._unsafe_masked_index_put_accumulate(zeros, mask, [ids], rows)


def _index_put(g_head, mask, ids, rows, s):
    return aten.index_put(torch.full((V, H), 0.0), [ids], rows, True) + g_head * s


@pytest.mark.parametrize("fn", [_masked, _index_put], ids=["masked", "index_put"])
def test_scatter_goes_into_the_other_gradient(fn):
    gm = _traced(fn)
    assert accumulate_into_other_grad(gm.graph) == 1
    gm.recompile()
    targets = [n.target for n in gm.graph.nodes]
    assert aten.add.Tensor not in targets and aten.full.default not in targets
    assert aten._unsafe_index_put.default in targets or aten.index_put.default in targets
    assert_close_rel(gm(*_inputs()), fn(*_inputs()))


def _broadcast(g_head, mask, ids, rows, s):
    zeros = torch.full((V, H), 0.0)
    return g_head[:1] + aten._unsafe_masked_index_put_accumulate(zeros, mask, [ids], rows)


def _zeros_used_twice(g_head, mask, ids, rows, s):
    zeros = torch.full((V, H), 0.0)
    return g_head + aten._unsafe_masked_index_put_accumulate(zeros, mask, [ids], rows), zeros


def _nonzero_base(g_head, mask, ids, rows, s):
    ones = torch.full((V, H), 1.0)
    return g_head + aten._unsafe_masked_index_put_accumulate(ones, mask, [ids], rows)


def _not_accumulating(g_head, mask, ids, rows, s):
    return aten.index_put(torch.full((V, H), 0.0), [ids], rows, False) + g_head


@pytest.mark.parametrize("fn", [_broadcast, _zeros_used_twice, _nonzero_base, _not_accumulating])
def test_left_alone(fn):
    gm = _traced(fn)
    before = [n.target for n in gm.graph.nodes]
    assert accumulate_into_other_grad(gm.graph) == 0
    assert [n.target for n in gm.graph.nodes] == before


def _tied_llama():
    from mst_compile.bench.models import build_llama

    return build_llama("llama-tiny", tie_word_embeddings=True).float()


@pytest.mark.slow
def test_tied_model_end_to_end():
    """Compiled with Inductor (no cache, so the post-grad pass runs): the rewrite happens once and every
    gradient matches eager's, the tied weight's included."""
    from mst_compile.bench.models import token_batch

    model = _tied_llama()
    ids = token_batch(64, model.config.vocab_size)
    model(input_ids=ids, labels=ids).loss.backward()
    ref = grads(model)
    model.zero_grad(set_to_none=True)
    with torch._inductor.config.patch(force_disable_caches=True):  # (monkeypatch would delete the key on undo)
        torch.compile(lambda i: model(input_ids=i, labels=i).loss, backend="mst", options={"num_chunks": 2})(ids).backward()
    assert mst_compile.counters["embedding_grad_accumulated"] == 1
    for name, g in grads(model).items():
        assert_close_rel(g, ref[name], name=name)
