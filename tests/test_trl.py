"""TRL's ``SFTTrainer`` on mst with no model edits: ``model.compile(backend="mst")`` (in place) before the trainer.

``SFTTrainer(model=torch.compile(model, backend="mst"))`` compiles nothing: TRL's ``add_fused_lm_head`` sets
``forward`` on the ``OptimizedModule`` wrapper to a function that calls ``self.base_model`` and the LM head, both
looked up through the wrapper onto the uncompiled model. In place, the module's ``_call_impl`` is compiled and
TRL's replacement ``forward`` is what Dynamo traces: the MLPs are chunked by mst, TRL's own chunked head
(``ChunkedLogProbFunction``, ``out=`` GEMMs into a buffer view) is a graph break and runs as TRL wrote it.
The runs go through ``examples/sft_trl.py``'s ``run``, as the README's table does."""

import importlib.util
import os

import pytest
import torch

import mst_compile

pytest.importorskip("trl")
pytest.importorskip("datasets")
pytestmark = pytest.mark.slow  # SFTTrainer runs, each compiles the model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("sft_trl_example", os.path.join(ROOT, "examples", "sft_trl.py"))
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


def _run(tmp_path, *argv):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    mst_compile.reset_counters()
    return example.run(example._args(["--out", str(tmp_path), "--num-chunks", "3", *argv]))


def _close(got, ref, rtol=1e-4):
    assert len(got) == len(ref) > 0, (got, ref)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=rtol, atol=1e-5)


def test_sft_trainer_with_wrapped_model_compiles_nothing(tmp_path):
    """Why the recipe is in place: TRL replaces the wrapper's ``forward``; Dynamo never runs."""
    res = _run(tmp_path, "--compile", "wrap", "--steps", "1")
    assert res["frames"].get("total", 0) == 0 and res["counters"] == {}


#: the default setup runs both arms through Inductor; the others run mst's rewrite by AOTAutograd without code
#: generation (``--mst-compiler aot_eager``: the same graphs, minutes less of C++ compiles per case) against the
#: model run eagerly (``--backend none``: the reference values, without a second minute of Dynamo tracing)
_COMPILERS = {"default": "inductor", "padding_free": "aot_eager", "packing": "aot_eager", "completion_only": "aot_eager"}


def _arms(compiler):
    if compiler == "inductor":
        return ("--backend", "inductor"), ("--backend", "mst")
    return ("--backend", "none"), ("--backend", "mst", "--mst-compiler", "aot_eager")


@pytest.mark.parametrize("setup", list(_COMPILERS))
def test_sft_trainer_in_place_mst_matches_the_reference(tmp_path, setup):
    ref_arm, mst_arm = _arms(_COMPILERS[setup])
    ref = _run(tmp_path / "ref", *ref_arm, "--setup", setup)
    got = _run(tmp_path / "mst", *mst_arm, "--setup", setup)
    if ref_arm[1] == "none":
        assert ref["frames"].get("total", 0) == 0, ref["frames"]  # the reference compiled nothing
    assert ref["loss_type"] == got["loss_type"] == "nll"  # TRL 1.16: the fused, chunked head (chunked_nll's alias)
    assert got["frames"]["ok"] > 0, got["frames"]  # Dynamo ran
    assert got["counters"]["mlp_rewritten"] >= 2, got["counters"]  # both MLPs of every backbone graph chunked
    # TRL's head is its own chunked autograd.Function, a graph break: mst never sees it, and leaves it as it is
    assert got["counters"].get("head_rewritten", 0) == 0
    if setup == "padding_free":
        assert "position_ids" in got["batch_keys"] and "attention_mask" not in got["batch_keys"], got["batch_keys"]
    if setup == "completion_only":
        whole = _run(tmp_path / "all", *mst_arm, "--steps", "1")
        assert got["loss"][0] != whole["loss"][0]  # the mask changes the loss
    _close(got["loss"], ref["loss"])


def test_sft_trainer_gradient_accumulation_scale_is_trls(tmp_path):
    """Two micro-batches of one row must give the loss of one batch of two rows: TRL divides by the batch's
    token count (``num_items_in_batch``); a 1/GA scaling bug would show as a factor of 2."""
    ref_arm, mst_arm = _arms("aot_eager")
    whole = _run(tmp_path / "b2", *mst_arm, "--batch", "2")
    accum = _run(tmp_path / "ga", *mst_arm, "--batch", "1", "--setup", "ga")
    ref = _run(tmp_path / "ref", *ref_arm, "--batch", "1", "--setup", "ga")
    assert accum["counters"]["mlp_rewritten"] >= 2
    _close(accum["loss"], ref["loss"])
    _close(accum["loss"], whole["loss"])
