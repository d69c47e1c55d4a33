"""torchtitan's Llama 3 under ``compile.backend = "mst"``: its ``apply_compile`` compiles each transformer block
on its own and its ``CrossEntropyLoss`` compiles the loss on its own; the final norm and ``lm_head`` run
eagerly between them.

What that layout allows: every block graph holds one whole SwiGLU MLP, which mst chunks. What it does not:
the loss graph starts at the logits (``lm_head`` already ran, outside any graph), so there is no projection
to fuse with the cross-entropy and the full ``tokens x vocab`` logits exist as in plain torchtitan. Compiling
``lm_head`` + loss together (torchtitan's ``_skip_lm_head`` switch, which its ``ChunkedLossWrapper`` uses, and
a three-line wrapper) lets mst chunk the head too. torchtitan's language-model attention backends are
FlexAttention and varlen; its ``apply_compile`` refuses FlexAttention with any backend other than
``inductor``/``aot_eager``, so these tests build the blocks with its SDPA inner attention.
"""

import pytest
import torch

import mst_compile
from tests.frameworks.helpers import (
    FAST,
    assert_same_training_step,
    compare_memory,
    describe,
    examples,
    param_grads,
    restore_dynamo_config,
    rewritten,
)

pytest.importorskip("torchtitan.models.llama3")  # also needs triton importable: torchtitan imports it at import


@pytest.fixture(autouse=True)
def _dynamo_settings():
    """``apply_compile`` sets Dynamo options process-wide; the rest of the suite must not see them."""
    yield from restore_dynamo_config()


def _batch(seed=0, t=33):
    return torch.randint(0, 256, (2, t), generator=torch.Generator().manual_seed(seed))


def _eager(model, ids):
    ex = examples()
    loss = ex.titan_step(model, ex.titan_compile(model, "eager"), ids)
    loss.backward()
    ref = param_grads(model)
    model.zero_grad(set_to_none=True)
    return loss.detach(), ref


def test_apply_compile_chunks_the_mlp_in_every_block():
    ex = examples()
    model, ids = ex.titan_model(), _batch()
    ref_loss, ref = _eager(model, ids)
    loss_fn = ex.titan_compile(model, "mst")
    with mst_compile.config_context(**FAST):  # torchtitan passes only the backend name: options as the default
        loss = ex.titan_step(model, loss_fn, ids)
        loss.backward()
    # the two blocks are one class, so Dynamo compiles one block graph and runs it for both
    block_graphs = [r for r in mst_compile.reports() if r.rewritten("mlp")]
    assert len(block_graphs) == 1 and len(block_graphs[0].rewritten("mlp")) == 1, describe()
    assert all(r.parameters() for r in block_graphs)
    loss_graph = [r for r in mst_compile.reports() if r.skipped("head")]
    assert loss_graph and "between the projection and the loss" in loss_graph[0].skipped("head")[0].reason, describe()
    assert rewritten("head") == 0
    assert_same_training_step(ref_loss, ref, loss, model)


def test_head_and_loss_compiled_together_chunk_the_head():
    """The blocks as ``apply_compile`` leaves them, the model's output stopped before ``lm_head``
    (``_skip_lm_head``) and ``lm_head`` + torchtitan's ``cross_entropy_loss`` compiled as one function."""
    from torchtitan.components.loss import cross_entropy_loss

    ex = examples()
    model, ids = ex.titan_model(), _batch()
    ref_loss, ref = _eager(model, ids)
    ex.titan_compile(model, "mst")
    model._skip_lm_head = True
    n = torch.tensor(ids[:, 1:].numel())
    head_loss = torch.compile(lambda h, y: cross_entropy_loss(model.lm_head(h), y) / n, backend="mst")
    with mst_compile.config_context(**FAST):
        loss = head_loss(model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
    assert (rewritten("mlp"), rewritten("head")) == (1, 1), describe()
    assert_same_training_step(ref_loss, ref, loss, model)


def test_flex_attention_blocks_are_refused_by_apply_compile():
    """torchtitan's own check (``_maybe_regional_inductor_backend``): FlexAttention only with ``inductor`` or
    ``aot_eager``. A flex model is compiled with mst only by calling ``block.compile(backend="mst")`` oneself."""
    ex = examples()
    model = ex.titan_model(attention="flex")
    with pytest.raises(ValueError, match="neither 'inductor' nor 'aot_eager'"):
        ex.titan_compile(model, "mst")


@pytest.mark.slow
def test_per_block_compiled_step_peak_is_below_inductor():
    """4096 tokens, dim 128, SwiGLU hidden 2048, vocab 512 (the eager head small: the blocks dominate), fp32,
    mst's default options (the fused ``wqkv`` split once made the selective-recompute tags fail the partitioner:
    tests/passes/aten/test_recompute_pass.py)."""
    base, mst = compare_memory("torchtitan", 4096)
    assert mst["counters"]["mlp_rewritten"] == 1 and not mst["counters"].get("fallback_compile"), mst["reports"]
    # measured here: 58.8 vs 255.0 MiB (0.23), the same loss
    assert mst["peak_mib"] < 0.4 * base["peak_mib"], (mst["peak_mib"], base["peak_mib"])
