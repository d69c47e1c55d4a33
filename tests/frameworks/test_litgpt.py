"""litgpt (``litgpt.GPT`` + ``litgpt.utils.chunked_cross_entropy``) under ``backend="mst"``, no model edits.

Config styles: Llama (``LLaMAMLP``, RMSNorm), Pythia (``GptNeoxMLP``, parallel residual, partial rotary),
Gemma 2 (``GemmaMLP`` gelu-tanh gating, softcapping), Phi-2 (parallel residual with one shared norm: the fused
qkv and fc1 read the same tensor), Phi-3 (sliding window), Mixtral (``LLaMAMoE``: a ``torch.where``
expert loop, one chunked region when Dynamo captures ``torch.where``, graph breaks at it otherwise).
"""

import pytest
import torch

import mst_compile
from tests.frameworks.helpers import FAST, assert_same_training_step, compare_memory, describe, examples, param_grads, rewritten

pytest.importorskip("litgpt")

STYLES = ["Llama-3.2-1B", "pythia-14m", "gemma-2-2b", "phi-2", "Phi-3-mini-4k-instruct"]


def _ids(seed=0, t=24):
    return torch.randint(0, 256, (2, t), generator=torch.Generator().manual_seed(seed))


def _eager(model, ids, chunk_size):
    loss = examples().litgpt_loss(model, ids, chunk_size)
    loss.backward()
    ref = param_grads(model)
    model.zero_grad(set_to_none=True)
    return loss.detach(), ref


@pytest.mark.parametrize("name", STYLES)
def test_step_with_plain_cross_entropy_chunks_mlps_and_head(name):
    """The step (model + ``chunked_cross_entropy(chunk_size=0)``) compiled as one function: every layer's MLP
    and the head + loss are rewritten; the loss and every gradient equal eager's."""
    ex = examples()
    model, ids = ex.litgpt_model(name, block=64), _ids()
    ref_loss, ref = _eager(model, ids, 0)
    step = torch.compile(lambda i: ex.litgpt_loss(model, i, 0), backend="mst", options=FAST)
    loss = step(ids)
    loss.backward()
    assert (rewritten("mlp"), rewritten("head")) == (2, 1), describe()
    # NOTE [unrolled row writes]: the sliding-window layers' row-by-row mask is one op (Gemma 2: every other layer)
    sliding = {"gemma-2-2b": 1, "Phi-3-mini-4k-instruct": 2}.get(name, 0)
    assert rewritten("rows") == sliding, describe()
    assert_same_training_step(ref_loss, ref, loss, model)


def test_litgpt_default_chunked_loss_is_fused_with_the_head():
    """litgpt's default loss (``chunk_size=128``) splits the logits and sums ``cross_entropy(reduction="none")``
    over the pieces: the split-loss pass makes it one cross-entropy, which the head pass fuses; MLPs and head are
    rewritten and the step is eager's."""
    ex = examples()
    model, ids = ex.litgpt_model("Llama-3.2-1B", block=512), _ids(t=300)  # 598 tokens: 5 loss splits of 128
    ref_loss, ref = _eager(model, ids, 128)
    step = torch.compile(lambda i: ex.litgpt_loss(model, i, 128), backend="mst", options=FAST)
    loss = step(ids)
    loss.backward()
    assert (rewritten("mlp"), rewritten("head")) == (2, 1), describe()
    assert_same_training_step(ref_loss, ref, loss, model)


def test_compiled_model_with_the_loss_outside_chunks_mlps():
    """litgpt's pretrain/finetune scripts compile the model and compute the loss outside it: the graph ends at
    the logits (no loss in it, so no head to fuse); the MLPs are rewritten and the logits are exact."""
    ex = examples()
    model, ids = ex.litgpt_model("Llama-3.2-1B", block=64), _ids()
    ref_logits = model(ids)
    cm = torch.compile(model, backend="mst", options=FAST)
    logits = cm(ids)
    assert (rewritten("mlp"), rewritten("head")) == (2, 0), describe()
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    ref_loss, ref = _eager(model, ids, 0)
    loss = ex.litgpt_loss(cm, ids, 0)
    loss.backward()
    assert_same_training_step(ref_loss, ref, loss, model)


def test_mixtral_style_moe_trains_like_eager():
    """``LLaMAMoE`` routes with ``torch.where`` on data-dependent masks: by default Dynamo breaks the graph
    there; the expert MLPs that land in graphs of their own are chunked. Loss and gradients equal eager's."""
    ex = examples()
    model, ids = ex.litgpt_model("Mixtral-8x7B-v0.1", block=64, n_expert=4, n_expert_per_token=2), _ids()
    ref_loss, ref = _eager(model, ids, 0)
    step = torch.compile(lambda i: ex.litgpt_loss(model, i, 0), backend="mst", options=FAST)
    loss = step(ids)
    loss.backward()
    chunked = sum(v for k, v in mst_compile.counters.items() if k.endswith("_rewritten") and not k.startswith("head"))
    assert chunked >= 1, describe()
    assert_same_training_step(ref_loss, ref, loss, model)


def test_mixtral_style_moe_with_where_captured_is_one_graph_and_chunked():
    """With ``capture_dynamic_output_shape_ops`` the step is one graph: each ``LLaMAMoE`` block (router, masks,
    ``torch.where`` dispatch, experts, indexed combine) is one region (NOTE [selected rows]), the head + loss
    another; loss and every gradient equal eager's."""
    ex = examples()
    model, ids = ex.litgpt_model("Mixtral-8x7B-v0.1", block=64, n_expert=4, n_expert_per_token=2), _ids()
    ref_loss, ref = _eager(model, ids, 0)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        step = torch.compile(lambda i: ex.litgpt_loss(model, i, 0), backend="mst", options=FAST)
        loss = step(ids)
    loss.backward()
    assert (rewritten("moe"), rewritten("head"), mst_compile.counters["graphs"]) == (2, 1, 1), describe()
    assert_same_training_step(ref_loss, ref, loss, model)


@pytest.mark.slow
def test_compiled_step_peak_is_below_inductor():
    """4096 tokens, H=128, I=1024, V=8192, fp32, one step compiled (model + plain cross-entropy)."""
    base, mst = compare_memory("litgpt", 4096)
    assert mst["counters"]["mlp_rewritten"] == 2 and mst["counters"]["head_rewritten"] == 1, mst["reports"]
    # measured here: 38 vs 264 MiB (0.14), loss equal to 1e-7 relative
    assert mst["peak_mib"] < 0.4 * base["peak_mib"], (mst["peak_mib"], base["peak_mib"])


@pytest.mark.slow
def test_mixtral_style_step_peak_is_below_inductor():
    """4096 tokens, 8 experts top-2, H=128, I=1024, V=8192, fp32, ``torch.where`` captured in both arms."""
    base, mst = compare_memory("litgpt", 4096, "--litgpt-config", "Mixtral-8x7B-v0.1")
    assert mst["counters"]["moe_rewritten"] == 2 and mst["counters"]["head_rewritten"] == 1, mst["reports"]
    assert mst["peak_mib"] < 0.5 * base["peak_mib"], (mst["peak_mib"], base["peak_mib"])
