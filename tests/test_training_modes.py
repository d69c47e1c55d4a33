"""Ways people train that must compose with mst: masks and padding, frozen weights, checkpointing,
``num_items_in_batch``, losses written outside the model, and a multi-step AdamW loop."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import mst_compile
from mst_compile.bench import zoo
from tests.conftest import assert_close_rel, grads

AOT = {"num_chunks": 3, "compiler": "aot_eager"}


def _compare(model, call, options=AOT, expect=(2, 1)):
    """``call(model) -> loss``: eager vs mst on the same weights, loss and every gradient."""
    ref_loss = call(model)
    ref_loss.backward()
    ref = grads(model)
    model.zero_grad(set_to_none=True)
    loss = call(torch.compile(model, backend="mst", options=options))
    loss.backward()
    got = grads(model)
    model.zero_grad(set_to_none=True)
    c = mst_compile.counters
    assert (c["mlp_rewritten"], c["head_rewritten"]) == expect, [str(r) for r in mst_compile.reports()]
    assert_close_rel(loss, ref_loss, name="loss")
    assert got.keys() == ref.keys()
    for n in ref:
        assert_close_rel(got[n], ref[n], name=n)


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, zoo.V, (3, 21), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :8] = 0  # left padding
    mask[2, 15:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def test_padding_and_attention_mask():
    ids, mask, labels = _batch()
    _compare(zoo.build("qwen2"), lambda m: m(input_ids=ids, attention_mask=mask, labels=labels).loss)


def test_frozen_parameters_get_no_gradient():
    model = zoo.build("llama")
    for n, p in model.named_parameters():
        if "gate_proj" in n or "embed" in n or "lm_head" in n:
            p.requires_grad_(False)  # LoRA-style frozen base weights
    ids, mask, labels = _batch()
    _compare(model, lambda m: m(input_ids=ids, labels=labels).loss)
    assert model.lm_head.weight.grad is None


def test_num_items_in_batch_sum_reduction():
    ids, mask, labels = _batch()
    n = torch.tensor(int((labels != -100).sum()) + 5)  # as a Trainer with gradient accumulation passes it
    _compare(zoo.build("llama"), lambda m: m(input_ids=ids, labels=labels, num_items_in_batch=n).loss)


def test_loss_written_outside_the_model_on_hidden_states():
    model = zoo.build("mistral")
    ids, mask, labels = _batch()

    def step(m):
        inner = m._orig_mod if hasattr(m, "_orig_mod") else m
        fn = lambda i, y: F.cross_entropy(  # noqa: E731
            inner.lm_head(inner.model(input_ids=i).last_hidden_state)[:, :-1].flatten(0, 1).float(),
            y[:, 1:].flatten(), ignore_index=-100,
        )  # fmt: skip
        return (torch.compile(fn, backend="mst", options=AOT) if m is not inner else fn)(ids, labels)

    _compare(model, step)


@pytest.mark.parametrize("how", ["hf", "user"])
def test_activation_checkpointing(how, trace_checkpoints):
    model = zoo.build("llama")
    trace_checkpoints(model)  # NOTE [checkpointed layer tracing]
    ids, mask, labels = _batch()
    if how == "hf":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        _compare(model, lambda m: m(input_ids=ids, labels=labels).loss)
        return

    def step(m):
        inner = m._orig_mod if hasattr(m, "_orig_mod") else m

        def fn(i, y):
            h = inner.model.embed_tokens(i)
            pos = torch.arange(i.shape[1])[None]
            emb = inner.model.rotary_emb(h, pos)
            for layer in inner.model.layers:
                h = checkpoint(layer, h, position_embeddings=emb, use_reentrant=False)
            logits = inner.lm_head(inner.model.norm(h))
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), y[:, 1:].flatten())

        return (torch.compile(fn, backend="mst", options=AOT) if m is not inner else fn)(ids, labels)

    _compare(model, step)


def test_checkpointed_layers_run_eagerly_without_the_recipe_and_mst_says_so(monkeypatch, caplog):
    """NOTE [checkpointed layer tracing]: where a forward side effect in HF's layers (transformers >= 5.25) makes
    Dynamo run each checkpointed layer eagerly, no MLP reaches the backend; mst warns once, naming the recipe."""
    from torch._dynamo.utils import counters

    from mst_compile import recipes

    model = zoo.build("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, mask, labels = _batch()
    counters.clear()
    monkeypatch.setattr(recipes, "_warned_eager_checkpoints", False)
    with mst_compile._compat.dynamo_config().patch(skip_fwd_side_effects_in_bwd_under_checkpoint=False):
        with caplog.at_level("WARNING", logger="mst_compile"):
            torch.compile(model, backend="mst", options=AOT)(input_ids=ids, labels=labels).loss.backward()
    if not mst_compile._compat.checkpoint_side_effect_breaks():
        pytest.skip("this transformers' layers have no forward side effect under checkpointing")
    assert mst_compile.counters["mlp_rewritten"] == 0
    warned = [r.getMessage() for r in caplog.records if "trace_checkpointed_layers" in r.getMessage()]
    assert len(warned) == 1, warned


@pytest.mark.slow
def test_adamw_loop_follows_torch_compile():
    """Five AdamW steps: the loss curve of mst equals torch.compile default's (both through Inductor)."""
    ids, mask, labels = _batch()
    curves = {}
    for backend in ("inductor", "mst"):
        torch._dynamo.reset()
        model = zoo.build("llama")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        opts = {"options": {"num_chunks": 3}} if backend == "mst" else {}
        cm = torch.compile(model, backend=backend, **opts)
        curve = []
        for _ in range(5):
            loss = cm(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            curve.append(loss.item())
        curves[backend] = curve
    assert curves["inductor"][-1] < curves["inductor"][0] - 0.1  # it trains
    torch.testing.assert_close(torch.tensor(curves["mst"]), torch.tensor(curves["inductor"]), rtol=1e-4, atol=1e-5)
