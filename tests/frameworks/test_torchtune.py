"""torchtune's llama3 under ``TORCH_COMPILE_BACKEND=mst``, compiled as its recipes do with ``compile: True``:
``training.compile_model`` compiles each ``TransformerSelfAttentionLayer`` on its own and
``training.compile_loss`` compiles only ``CEWithChunkedOutputLoss.compute_cross_entropy``; the output projection
runs eagerly in ``num_output_chunks`` pieces.

What mst chunks there: the MLP in the layer graph. Not the head: torchtune already chunks the output
projection itself (eagerly, so each piece's logits are kept for backward), and the compiled loss starts at the
logits. Compiling the model with ``num_output_chunks=0`` and a plain cross-entropy in one function instead
lets mst chunk the head as well.
"""

import pytest
import torch
import torch.nn.functional as F

import mst_compile
from tests.frameworks.helpers import FAST, assert_same_training_step, compare_memory, describe, examples, param_grads, rewritten

pytest.importorskip("torchtune.training")  # torchtune imports torchao at import (torchao < 0.15 for torchtune 0.6)


def _batch():
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, :5] = -100
    return ids, labels


def _plain_ce(logits, labels):
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def _eager(model, loss_fn, ids, labels):
    loss = loss_fn(model(ids), labels)
    loss.backward()
    ref = param_grads(model)
    model.zero_grad(set_to_none=True)
    return loss.detach(), ref


def test_recipe_compile_chunks_the_mlp_in_every_layer():
    ex = examples()
    model, (ids, labels) = ex.tune_model(chunks=4), _batch()
    ref_loss, ref = _eager(model, ex.tune_compile(model, "eager", chunks=4), ids, labels)
    loss_fn = ex.tune_compile(model, "mst", chunks=4)
    with mst_compile.config_context(**FAST):  # the recipes pass only a backend name
        loss = loss_fn(model(ids), labels)
        loss.backward()
    layer_graphs = [r for r in mst_compile.reports() if r.rewritten("mlp")]
    assert len(layer_graphs) == 1 and len(layer_graphs[0].rewritten("mlp")) == 1, describe()  # one graph, both layers
    assert rewritten("head") == 0
    skipped = [r.reason for rep in mst_compile.reports() for r in rep.skipped("head")]
    assert skipped and all("between the projection and the loss" in why for why in skipped), describe()
    assert_same_training_step(ref_loss, ref, loss, model)


def test_whole_model_with_one_cross_entropy_chunks_mlps_and_head():
    model, (ids, labels) = examples().tune_model(chunks=0), _batch()
    ref_loss, ref = _eager(model, _plain_ce, ids, labels)
    step = torch.compile(lambda i, y: _plain_ce(model(i), y), backend="mst", options=FAST)
    loss = step(ids, labels)
    loss.backward()
    assert (rewritten("mlp"), rewritten("head")) == (2, 1), describe()
    assert_same_training_step(ref_loss, ref, loss, model)


@pytest.mark.slow
def test_recipe_compiled_step_peak_is_below_inductor():
    """4096 tokens, dim 128, MLP hidden 2048, vocab 512, 8 output chunks (torchtune's), fp32."""
    base, mst = compare_memory("torchtune", 4096)
    assert mst["counters"]["mlp_rewritten"] == 1, mst["reports"]
    # measured here: 50.6 vs 259.0 MiB (0.20), the same loss
    assert mst["peak_mib"] < 0.4 * base["peak_mib"], (mst["peak_mib"], base["peak_mib"])
