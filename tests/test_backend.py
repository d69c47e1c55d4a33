"""End to end through Dynamo + Inductor: parity with eager, returned logits, options, fallback."""

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import mst_compile
from mst_compile.bench.models import build_llama
from tests.conftest import assert_close_rel, grads
from tests.modules import Block, GatedMLP, LMHead, PlainMLP

TINY = dict(hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=320)  # fmt: skip


def _llama(seed=0):
    return build_llama("llama-tiny", seed=seed, **TINY)


def _ids(batch=2, seq=23, vocab=320, seed=1, ignore=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    if ignore:
        labels[0, :15] = -100  # after the label shift, the whole first chunk (12 tokens) is ignored
        labels[1, -4:] = -100
    return ids, labels


def _eager(model, ids, labels, extra=None):
    out = model(input_ids=ids, labels=labels)
    loss = out.loss + (extra(out.logits) if extra else 0)
    loss.backward()
    res = (out.loss.detach(), out.logits.detach(), grads(model))
    model.zero_grad(set_to_none=True)
    return res


def _check(model, ref, got, logits=True):
    assert_close_rel(got[0], ref[0], name="loss")
    if logits:
        assert_close_rel(got[1], ref[1], name="logits")
    assert ref[2].keys() == got[2].keys()
    for n in ref[2]:
        assert_close_rel(got[2][n], ref[2][n], name=n)


@pytest.fixture(scope="module")
def llama():
    return _llama()


def test_llama_model_form_parity_and_regions(llama):
    ids, labels = _ids()
    ref = _eager(llama, ids, labels)
    cm = torch.compile(llama, backend="mst", options={"num_chunks": 4})
    got = _eager(cm, ids, labels)  # 46 tokens in 4 chunks: ragged last chunk
    _check(llama, ref, got)
    assert mst_compile.counters["mlp_rewritten"] == 2
    assert mst_compile.counters["head_rewritten"] == 1
    assert mst_compile.counters["fallback_compile"] == 0
    rep = mst_compile.last_report()
    assert {r.chunks for r in rep.rewritten() if r.kind != "mask"} == {"4"}
    assert "logits=bridge" in rep.rewritten("head")[0].shapes


def test_llama_step_form_parity(llama):
    ids, labels = _ids(ignore=False)

    def step(ids, labels):
        return llama(input_ids=ids, labels=labels).loss

    ref = _eager(llama, ids, labels)
    loss = torch.compile(step, backend="mst", options={"num_chunks": 64})(ids, labels)  # more chunks than rows
    loss.backward()
    _check(llama, ref, (loss.detach(), None, grads(llama)), logits=False)
    llama.zero_grad(set_to_none=True)
    assert mst_compile.counters["head_rewritten"] == 1
    assert "not returned" in mst_compile.last_report().rewritten("head")[0].shapes


def test_user_loss_on_returned_logits_gets_its_gradient(llama):
    """The logits leave the graph without autograd history; the runner re-attaches their gradient."""
    ids, labels = _ids(seed=3)

    def extra(logits):
        return 0.1 * logits.float().square().mean()

    ref = _eager(llama, ids, labels, extra)
    got = _eager(torch.compile(llama, backend="mst", options={"num_chunks": 3}), ids, labels, extra)
    _check(llama, ref, got)


def test_skip_logits_raises_on_use(llama):
    ids, labels = _ids()
    ref = _eager(llama, ids, labels)
    cm = torch.compile(llama, backend="mst", options={"logits": "skip", "num_chunks": 2})
    out = cm(input_ids=ids, labels=labels)
    assert out.logits.shape == (2, 23, 320)
    with pytest.raises(RuntimeError, match="not materialized"):
        out.logits.sum()
    out.loss.backward()
    _check(llama, ref, (out.loss.detach(), None, grads(llama)), logits=False)
    llama.zero_grad(set_to_none=True)


def test_all_ignored_labels_give_nan_like_eager(llama):
    ids, _ = _ids()
    labels = torch.full_like(ids, -100)
    ref = _eager(llama, ids, labels)
    got = _eager(torch.compile(llama, backend="mst", options={"num_chunks": 4}), ids, labels)
    assert torch.isnan(ref[0]) and torch.isnan(got[0])
    for n in ref[2]:
        torch.testing.assert_close(got[2][n], ref[2][n], equal_nan=True)


def test_no_grad_eval_forward(llama):
    ids, labels = _ids()
    llama.eval()
    try:
        with torch.no_grad():
            ref = llama(input_ids=ids, labels=labels)
            got = torch.compile(llama, backend="mst", options={"num_chunks": 4})(input_ids=ids, labels=labels)
    finally:
        llama.train()
    assert_close_rel(got.loss, ref.loss)
    assert_close_rel(got.logits, ref.logits)
    assert mst_compile.counters["mlp_rewritten"] == 2  # forward-only graphs are chunked too


class ToyLM(torch.nn.Module):
    """Every hand-built pattern in one model (one compile): GeGLU+bias, ReLU MLP, softcapped head."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(200, 16)
        self.a = Block(GatedMLP(act="gelu_tanh", bias=True), layers=1)
        self.b = Block(PlainMLP(act="relu"), layers=1)
        self.head = LMHead(softcap=4.0, smoothing=0.05, bias=True)

    def forward(self, ids, labels):
        return self.head(self.b(self.a(self.emb(ids))), labels)


def test_hand_built_patterns_parity():
    torch.manual_seed(0)
    model = ToyLM()
    ids, labels = _ids(batch=3, seq=13, vocab=200)
    model(ids, labels).backward()
    ref = (None, None, grads(model))
    model.zero_grad(set_to_none=True)
    loss_ref = model(ids, labels)
    loss = torch.compile(model, backend="mst", options={"num_chunks": 5})(ids, labels)
    loss.backward()
    assert_close_rel(loss, loss_ref)
    for n, g in grads(model).items():
        assert_close_rel(g, ref[2][n], name=n)
    assert mst_compile.counters["mlp_rewritten"] == 2 and mst_compile.counters["head_rewritten"] == 1


# ---- options ---------------------------------------------------------------------------------------------


def _first_compile_error(options):
    f = torch.compile(lambda x: x * 2, backend="mst", options=options)
    with pytest.raises(Exception) as ei:
        f(torch.ones(3))
    err = ei.value
    return getattr(err, "inner_exception", err)


def test_unknown_option_is_a_clear_value_error():
    err = _first_compile_error({"num_chunk": 4})
    assert isinstance(err, ValueError)
    assert "num_chunk" in str(err) and "num_chunks" in str(err)  # names the bad one and the valid ones


@pytest.mark.parametrize(
    "options",
    [{"num_chunks": 0}, {"logits": "none"}, {"num_chunks": 2, "chunk_tokens": 8}, {"chunk_memory_mib": -1},
     {"chunk_tokens": 8, "chunk_memory_mib": 64}, {"causal_mask": "yes"}, {"recompute": "all"},
     {"compile_bodies": "yes"}, {"verify": "maybe"}],
)  # fmt: skip
def test_bad_option_values(options):
    assert isinstance(_first_compile_error(options), ValueError)


def test_config_and_environment(monkeypatch):
    monkeypatch.setenv("MST_NUM_CHUNKS", "3")
    assert mst_compile.get_config().num_chunks == 3
    with mst_compile.config_context(num_chunks=5, head=False) as cfg:
        assert cfg.num_chunks == 5 and not cfg.head
    assert mst_compile.get_config().num_chunks == 3
    # one chunk-size setting replaces another instead of conflicting with it
    assert mst_compile.config.resolve({"chunk_memory_mib": 64}).num_chunks is None
    monkeypatch.setenv("MST_CHUNK_MEMORY_MIB", "auto")
    assert mst_compile.get_config().chunk_memory_mib is None
    monkeypatch.setenv("MST_MLP", "maybe")
    with pytest.raises(ValueError, match="MLP|mlp"):
        mst_compile.get_config()


def test_backend_string_works_in_a_fresh_process():
    code = textwrap.dedent(
        """
        import sys, torch
        f = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2, backend="mst")
        assert torch.allclose(f(torch.ones(4)), torch.nn.functional.gelu(torch.ones(4)) * 2)
        print("imported" if "mst_compile" in sys.modules else "not imported")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "imported" in out.stdout


# ---- fallback --------------------------------------------------------------------------------------------


def test_a_pass_that_crashes_falls_back_to_inductor(monkeypatch):
    def broken(gm, ctx):
        raise RuntimeError("injected")

    monkeypatch.setattr(mst_compile.passes, "PASSES", (("broken", broken, False),) + mst_compile.passes.PASSES)
    model = Block(GatedMLP())
    x = torch.randn(2, 5, 16)
    with pytest.warns(UserWarning, match="injected"):
        out = torch.compile(model, backend="mst")(x)
    torch.testing.assert_close(out, model(x))
    assert "injected" in mst_compile.last_report().fallback


def test_a_region_check_that_crashes_skips_only_that_region(monkeypatch):
    from mst_compile.passes.dynamo import mlp

    real = mlp._check_body
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("injected")
        return real(*a, **k)

    monkeypatch.setattr(mlp, "_check_body", flaky)
    model = Block(GatedMLP(), layers=2)
    x = torch.randn(2, 5, 16)
    with pytest.warns(UserWarning, match="internal error"):
        out = torch.compile(model, backend="mst", options={"num_chunks": 2})(x)
    torch.testing.assert_close(out, model(x))
    rep = mst_compile.last_report()
    assert len(rep.rewritten("mlp")) == 1 and len(rep.skipped("mlp")) == 1


CHUNKED = {"chunk_tokens": 4}  # ten tokens in three chunks: the MLP is rewritten


@pytest.mark.parametrize(
    "options, recompute, reuse",
    [(CHUNKED, "attention", False), ({**CHUNKED, "recompute": "norms"}, "norms", False),
     ({**CHUNKED, "recompute": "none"}, None, False),
     ({**CHUNKED, "inductor": {"allow_buffer_reuse": True}}, "attention", True), ({"enabled": False}, None, None),
     ({}, None, None)],
)  # fmt: skip
def test_inductor_patches(monkeypatch, options, recompute, reuse):
    """What the backend hands Inductor: on a rewritten graph the selective-recompute joint pass in the configured
    mode and the second recompute with it, buffer reuse off (NOTE [buffer reuse]) unless the user's ``inductor``
    options say otherwise, no horizontal fusion (NOTE [horizontal fusion]); on an untouched graph (ten tokens fit
    one chunk) only the tied-embedding scatter (NOTE [untouched graphs]); nothing when disabled."""
    import mst_compile.backend as backend
    from mst_compile.passes.aten.embedding_grad import EmbeddingGradPass
    from mst_compile.passes.aten.remat import RematPass

    seen = {}

    def fake_compile_fx(gm, example_inputs, config_patches=None):
        seen.update(config_patches or {})
        return gm.forward

    monkeypatch.setattr(backend._compat, "compile_fx", fake_compile_fx)
    mst_compile.reset_counters()
    torch.compile(Block(PlainMLP()), backend="mst", options=options)(torch.randn(2, 5, 16))
    report = mst_compile.last_report()
    assert bool(report and report.rewritten("mlp")) == ("chunk_tokens" in options)
    joint = seen.get("joint_custom_pre_pass")
    assert (joint.mode if joint else None) == recompute
    assert seen.get("allow_buffer_reuse") is reuse
    # the second recompute follows the recompute mode; horizontal fusion is off wherever mst's passes run
    assert isinstance(seen.get("post_grad_custom_pre_pass"), RematPass) == (recompute is not None)
    assert (seen.get("score_fusion_memory_threshold", 10) > 2**40) == (reuse is not None)
    post = backend._compat.custom_graph_passes(seen.get("post_grad_custom_post_pass"))  # others' passes too
    assert any(isinstance(p, EmbeddingGradPass) for p in post) == (options != {"enabled": False})


def test_inductor_failure_on_rewritten_graph_falls_back(monkeypatch):
    import mst_compile.backend as backend

    real = backend._inductor
    seen = []

    def failing_first(gm, *a, **k):
        seen.append(gm)
        if len(seen) == 1:
            raise RuntimeError("injected codegen failure")
        return real(gm, *a, **k)

    monkeypatch.setattr(backend, "_inductor", failing_first)
    model = Block(PlainMLP())
    x = torch.randn(2, 5, 16, requires_grad=True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = torch.compile(model, backend="mst", options={"num_chunks": 2})(x)
    assert any("injected codegen failure" in str(i.message) for i in w)
    torch.testing.assert_close(out, model(x))
    assert mst_compile.counters["fallback_compile"] == 1


@pytest.mark.slow
def test_dynamic_sequence_length_keeps_chunking_without_recompiles(llama):
    cm = torch.compile(llama, backend="mst", dynamic=True, options={"num_chunks": 3})
    for seq in (17, 29, 40):
        ids, labels = _ids(seq=seq)
        ref = _eager(llama, ids, labels)
        _check(llama, ref, _eager(cm, ids, labels))
    assert mst_compile.counters["graphs"] == 1  # one compile serves every length
    assert mst_compile.counters["head_rewritten"] == 1 and mst_compile.counters["fallback_compile"] == 0
    # the causal mask is proven for a symbolic length: rewritten once, valid for every length
    assert mst_compile.counters["mask_rewritten"] == 1


class _UserPass(torch._inductor.custom_graph_pass.CustomGraphPass):
    def __init__(self):
        self.calls = 0

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return "user-pass"


@pytest.mark.parametrize("where", ["global", "options"])
@pytest.mark.parametrize("slot", ["joint_custom_pre_pass", "post_grad_custom_pre_pass", "post_grad_custom_post_pass"])
def test_user_inductor_passes_are_chained_not_replaced(monkeypatch, slot, where):
    """NOTE [chained passes]: a pass the user or a framework installed still runs, before mst's."""
    import mst_compile.backend as backend

    seen = {}

    def fake_compile_fx(gm, example_inputs, config_patches=None):
        seen.update(config_patches or {})
        return gm.forward

    monkeypatch.setattr(backend._compat, "compile_fx", fake_compile_fx)
    user = _UserPass()
    options = {**CHUNKED, "inductor": {slot: user}} if where == "options" else CHUNKED
    # Inductor's config.patch, not monkeypatch (which deletes a config key on undo)
    with torch._inductor.config.patch({slot: user} if where == "global" else {}):
        torch.compile(Block(PlainMLP()), backend="mst", options=options)(torch.randn(2, 5, 16))
    chained = backend._compat.custom_graph_passes(seen[slot])
    assert len(chained) == 2 and chained[0] is user
    assert type(chained[1]).__module__.startswith("mst_compile.passes")


@pytest.mark.parametrize("slots", ["tuples", "one pass"])
def test_a_user_pass_runs_under_inductor_next_to_mst(monkeypatch, slots):
    """Both forms of a chained slot run under Inductor: a tuple, and for a torch whose slots take one pass
    (torch 2.11) one ``ChainedPass``, whose ``uuid`` is its passes' so Inductor's cache keeps working."""
    from mst_compile import _compat

    if slots == "one pass":
        monkeypatch.setattr(_compat, "SLOTS_HOLD_TUPLES", False)
    elif not _compat.SLOTS_HOLD_TUPLES:
        pytest.skip("this torch's Inductor slots take one pass")
    user = _UserPass()
    model = Block(PlainMLP())
    x = torch.randn(2, 5, 16, requires_grad=True)
    with torch._inductor.config.patch(post_grad_custom_post_pass=user, force_disable_caches=True):
        torch.compile(model, backend="mst", options={"num_chunks": 2})(x).sum().backward()
    assert user.calls >= 2  # the forward and the backward graph
    assert mst_compile.counters["mlp_rewritten"] == 2


def test_a_chained_pass_runs_its_passes_in_order_and_keys_the_cache_on_them():
    from mst_compile import _compat

    calls = []

    class P(_UserPass):
        def __init__(self, name):
            self.name = name

        def __call__(self, graph):
            calls.append(self.name)

        def uuid(self):
            return self.name

    chained = _compat.ChainedPass((P("a"), P("b")))
    chained(None)
    assert calls == ["a", "b"]
    assert chained.uuid() == repr(["a", "b"]) != _compat.ChainedPass((P("b"), P("a"))).uuid()
    assert _compat.ChainedPass((P("a"), lambda g: None)).uuid() is None  # a plain function: no cache key
    assert _compat.custom_graph_passes(chained) == chained.passes  # opened, so chaining again does not nest
    assert _compat.slot_value((chained.passes[0],)) is chained.passes[0]


def test_the_backend_registers_by_name_only_where_no_entry_point_did():
    from mst_compile import _compat
    from mst_compile.backend import mst_backend

    assert not _compat.register_backend_by_name("mst", mst_backend)  # the installed entry point's name
    name = "mst_registered_by_name_test"
    assert _compat.register_backend_by_name(name, mst_backend)
    assert not _compat.register_backend_by_name(name, mst_backend)
    out = torch.compile(Block(PlainMLP()), backend=name, options={"compiler": "aot_eager", "num_chunks": 2})
    out(torch.randn(2, 5, 16))
    assert mst_compile.counters["mlp_rewritten"] > 0  # mst compiled it


def test_a_recompile_keeps_the_settings_of_the_first_compile(monkeypatch):
    """NOTE [options fixed per compiled model]: a changed environment reaches models compiled after it, not a
    recompile of a model compiled before it."""
    monkeypatch.setenv("MST_NUM_CHUNKS", "2")
    model = Block(PlainMLP())
    cm = torch.compile(model, backend="mst", options={"compiler": "aot_eager"}, dynamic=False)
    cm(torch.randn(2, 6, 16))
    monkeypatch.setenv("MST_NUM_CHUNKS", "3")
    cm(torch.randn(2, 9, 16))  # a new static shape: a recompile of the same frame
    first, again = mst_compile.reports(model)
    assert {r.chunks for r in first.rewritten()} == {r.chunks for r in again.rewritten()} == {"2"}
    other = Block(PlainMLP(i=96))  # another model of the same classes: compiled after the change
    torch.compile(other, backend="mst", options={"compiler": "aot_eager"}, dynamic=False)(torch.randn(2, 6, 16))
    assert {r.chunks for r in mst_compile.last_report(other).rewritten()} == {"3"}


def test_frame_settings_are_bounded(monkeypatch):
    """NOTE [options fixed per compiled model]: the per-frame settings keep only the most recent frames."""
    from mst_compile import backend

    monkeypatch.setattr(backend, "_FRAME_CONFIGS", type(backend._FRAME_CONFIGS)())
    monkeypatch.setattr(backend, "_FRAME_CONFIGS_MAX", 3)
    for frame in range(5):
        monkeypatch.setattr(backend._compat, "compile_id", lambda frame=frame: (frame, 0))
        backend._config({"num_chunks": 2}, [])
    assert [k[0] for k in backend._FRAME_CONFIGS] == [2, 3, 4]


@pytest.mark.slow
def test_a_graph_mst_chunks_nothing_compiles_to_torch_compiles_code():
    """NOTE [untouched graphs]: a short sequence (every region fits one chunk) and the mask pass off: the
    kernels and wrapper Inductor writes for forward and backward are torch.compile's, line for line (a memory
    pass or config patch installed on such a graph changes them)."""
    from torch._inductor.utils import run_and_get_code

    from mst_compile.bench.models import token_batch

    model = build_llama("llama-tiny", num_hidden_layers=1).float()
    ids = token_batch(32, model.config.vocab_size)
    codes = {}
    for backend, options in (("inductor", None), ("mst", {"causal_mask": False})):
        torch._dynamo.reset()
        mst_compile.reset_counters()
        step = torch.compile(lambda i: model(input_ids=i, labels=i).loss, backend=backend, options=options)
        with torch._inductor.config.patch(force_disable_caches=True):
            _, code = run_and_get_code(lambda: step(ids).backward())
        codes[backend] = [c.replace(c.split("\n", 1)[0], "") if c.startswith("# AOT ID") else c for c in code]
    report = mst_compile.last_report()
    assert report.skipped("mlp") and report.skipped("head") and not report.rewritten()
    assert len(codes["mst"]) == 2 and codes["mst"] == codes["inductor"]


def test_a_pack_hook_that_reads_storage_does_not_see_compile_time_tensors(llama):
    """Offloading hooks (``save_on_cpu`` and the like) read each saved tensor's storage. mst's compile-time
    checks run on FakeTensors, which have none: they run with the caller's hooks deferred, as AOTAutograd's do."""
    ids, labels = _ids()
    ref = _eager(llama, ids, labels)
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().data_ptr())  # raises on a FakeTensor
        return t

    torch._dynamo.reset()
    mst_compile.reset_counters()
    cm = torch.compile(llama, backend="mst", options={"num_chunks": 4, "compiler": "aot_eager"})  # the passes' tracing
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a rewrite that fell back warns
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = cm(input_ids=ids, labels=labels)
        out.loss.backward()
    got = (out.loss.detach(), out.logits.detach(), grads(llama))
    llama.zero_grad(set_to_none=True)
    assert saved  # the hook ran, on the compiled step's real tensors
    assert mst_compile.counters["mlp_rewritten"] == 2
    _check(llama, ref, got)


def test_the_rewritten_graph_keeps_dynamos_static_inputs(monkeypatch):
    """NOTE [Dynamo's graph metadata]: the graph mst hands to Inductor marks the same inputs static as Dynamo's
    (the weights): under CUDA graphs (``mode="reduce-overhead"``) an input not marked is copied into the graph's
    pool on every replay, a second copy of every weight, and a chunk body keyed on its inputs would compile again
    inside the capture."""
    from mst_compile import _compat
    from mst_compile.backend import mst_backend

    seen = {}

    def backend(gm, example_inputs):
        seen["dynamo"] = _compat.static_input_indices(gm)
        return mst_backend(gm, example_inputs, options={"num_chunks": 2})

    def compile_fx(gm, example_inputs, config_patches=None):  # what Inductor would be given; run by aot_eager
        seen["mst"] = _compat.static_input_indices(gm)
        return _compat.lookup_backend("aot_eager")(gm, example_inputs)

    monkeypatch.setattr(_compat, "compile_fx", compile_fx)
    torch._dynamo.reset()
    mst_compile.reset_counters()
    model = Block(GatedMLP())
    torch.compile(model, backend=backend)(torch.randn(2, 6, 16)).sum().backward()
    assert mst_compile.counters["mlp_rewritten"] >= 1
    assert seen["dynamo"] and seen["mst"] == seen["dynamo"], seen
