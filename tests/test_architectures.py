"""Every architecture of the zoo: one region per layer's MLP plus the head, loss/logits/gradients = eager.

Runs the rewritten graphs through AOTAutograd without code generation (``compiler="aot_eager"``) to stay fast;
``test_backend.py`` covers the same ops through Inductor.
"""

import pytest
import torch

import mst_compile
from mst_compile.bench import zoo
from tests.conftest import assert_close_rel, grads


@pytest.mark.parametrize("name", [*zoo.ARCHS, "nanogpt"])
def test_architecture(name):
    model = zoo.build(name)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, zoo.V, (2, 19), generator=g)
    labels = ids.clone()
    labels[1, :7] = -100 if name != "nanogpt" else -1
    ref_loss, ref_logits = zoo.loss_fn(name, model, ids, labels)
    ref_loss.backward()
    ref = grads(model)
    model.zero_grad(set_to_none=True)
    cm = torch.compile(model, backend="mst", options={"num_chunks": 3, "compiler": "aot_eager"})
    loss, logits = zoo.loss_fn(name, cm, ids, labels)
    loss.backward()
    c = mst_compile.counters
    assert (c["mlp_rewritten"], c["head_rewritten"]) == (zoo.L, 1), [str(r) for r in mst_compile.reports()]
    assert_close_rel(loss, ref_loss, name="loss")
    assert_close_rel(logits, ref_logits, name="logits")
    got = grads(model)
    assert got.keys() == ref.keys()
    for n in ref:
        assert_close_rel(got[n], ref[n], name=n)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(zoo.AUTO_ARCHS))
def test_more_architectures_compile_exactly(model_type):
    """Walk more of the installed transformers' causal LMs: the expected regions, and never a wrong number."""
    model = zoo.build_auto(model_type)
    ids = torch.randint(3, zoo.V, (2, 11), generator=torch.Generator().manual_seed(0))
    ref = model(input_ids=ids, labels=ids)
    ref.loss.backward()
    ref_g = grads(model)
    model.zero_grad(set_to_none=True)
    cm = torch.compile(model, backend="mst", options={"num_chunks": 3, "compiler": "aot_eager"})
    out = cm(input_ids=ids, labels=ids)
    out.loss.backward()
    c = mst_compile.counters
    assert (c["mlp_rewritten"], c["head_rewritten"]) == (zoo.AUTO_ARCHS[model_type], 1), [
        str(r) for r in mst_compile.reports()
    ]
    assert_close_rel(out.loss, ref.loss, name="loss")
    assert_close_rel(out.logits, ref.logits, name="logits")
    for n, g in grads(model).items():
        assert_close_rel(g, ref_g[n], name=n)


@pytest.mark.slow
def test_regression_gpt2_transposed_conv1d_weights_through_inductor():
    """GPT-2's Conv1D weights reach the MLP op as ``W.t()`` views: the op's fake kernels must give the same
    (contiguous) gradient layout as the real ones, or Inductor's stride asserts fail."""
    model = zoo.build("gpt2")
    ids = torch.randint(3, zoo.V, (1, 40), generator=torch.Generator().manual_seed(0))
    ref = model(input_ids=ids, labels=ids).loss
    ref.backward()
    ref_g = grads(model)
    model.zero_grad(set_to_none=True)
    loss = torch.compile(model, backend="mst", options={"num_chunks": 3})(input_ids=ids, labels=ids).loss
    loss.backward()
    assert mst_compile.counters["mlp_rewritten"] == zoo.L
    assert_close_rel(loss, ref, name="loss")
    for n, g in grads(model).items():
        assert_close_rel(g, ref_g[n], name=n)


@pytest.mark.parametrize("name", [*zoo.ARCHS, "nanogpt", "opt", "phi", "mixtral"])  # (every AUTO_ARCHS: 1 min)
def test_compiled_bodies_reach_every_region(name):
    """With ``compile_bodies`` on (the CUDA default), every chunked region of every architecture runs its chunk
    body as Inductor code (NOTE [compiled bodies]): each MLP's row-wise middle, and the head's cross-entropy with
    whatever the model puts between its projection and the loss (HF's ``.float()``, Gemma-2's softcap).
    Detection only, in bf16 as on a GPU: the passes run, no kernel is compiled."""
    from mst_compile.ops import registry
    from mst_compile.ops.spec import HeadSpec, RowwiseSpec, parse
    from tests.conftest import calls, rewrite

    auto = name in zoo.AUTO_ARCHS
    model = (zoo.build_auto(name) if auto else zoo.build(name)).to(torch.bfloat16)
    ids = torch.randint(3, zoo.V, (2, 19), generator=torch.Generator().manual_seed(0))
    fn = (lambda i: model(input_ids=i, labels=i).loss) if auto else (lambda i: zoo.loss_fn(name, model, i, i))
    cfg = mst_compile.MSTConfig(num_chunks=3, compile_bodies="always")
    gm, ctx, _ = rewrite(fn, ids, config=cfg)
    # (a mixture-of-experts block's body runs op by op: NOTE [compiled bodies] does not apply to it)
    bodies = [parse(parse(n.args[-1], RowwiseSpec).body) for n in calls(gm, "rowwise")]
    mlps, (head,) = [b for b in bodies if b.kind == "mlp"], calls(gm, "linear_ce")
    assert len(mlps) == (zoo.AUTO_ARCHS[name] if auto else zoo.L), [str(r) for r in ctx.regions]
    assert all(b.compiled for b in mlps)
    assert registry.get(parse(head.args[-1], HeadSpec).post).compiled
