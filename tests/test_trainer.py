"""HF Trainer with mst: the pre-compiled model (one line), and the Inductor-pass switch for
``torch_compile_backend="inductor"`` users."""

import pytest
import torch

import mst_compile
from mst_compile.bench import zoo

pytestmark = pytest.mark.slow  # HF Trainer runs, one in two subprocesses

pytest.importorskip("accelerate")
from transformers import Trainer, TrainingArguments  # noqa: E402


def _data(n=8, seq=24):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": (t := torch.randint(3, zoo.V, (seq,), generator=g)), "labels": t.clone()} for _ in range(n)]


def _train(tmp_path, model, **args):
    targs = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, remove_unused_columns=False, seed=0, **args,
    )  # fmt: skip
    trainer = Trainer(model=model, args=targs, train_dataset=_data())
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_with_precompiled_mst_model_matches_inductor(tmp_path):
    torch._dynamo.reset()
    ref = _train(tmp_path / "a", torch.compile(zoo.build("llama"), backend="inductor"))
    torch._dynamo.reset()
    mst_compile.reset_counters()
    got = _train(tmp_path / "b", torch.compile(zoo.build("llama"), backend="mst", options={"num_chunks": 3}))
    assert mst_compile.counters["mlp_rewritten"] == 2 and mst_compile.counters["head_rewritten"] == 1
    assert len(got) == len(ref) == 3
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-4, atol=1e-5)


_TRAINER_SCRIPT = """
import json, sys, torch
import mst_compile
from mst_compile.bench import zoo
from transformers import Trainer, TrainingArguments
g = torch.Generator().manual_seed(0)
data = [{"input_ids": (t := torch.randint(3, zoo.V, (24,), generator=g)), "labels": t.clone()} for _ in range(8)]
args = TrainingArguments(output_dir=sys.argv[1], max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
    logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
    torch_compile=True, torch_compile_backend="inductor")
tr = Trainer(model=zoo.build("llama"), args=args, train_dataset=data)
tr.train()
print(json.dumps({"loss": [h["loss"] for h in tr.state.log_history if "loss" in h],
                  "counters": dict(mst_compile.counters)}))
"""


def _trainer_subprocess(tmp_path, env_on: bool):
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, MST_INDUCTOR_PASS="1" if env_on else "0", MST_NUM_CHUNKS="3")
    out = subprocess.run([sys.executable, "-c", _TRAINER_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_trainer_inductor_backend_with_mst_inductor_pass(tmp_path):
    """``torch_compile_backend="inductor"`` + ``MST_INDUCTOR_PASS=1``: no code change, MLPs chunked."""
    ref = _trainer_subprocess(tmp_path / "a", env_on=False)
    got = _trainer_subprocess(tmp_path / "b", env_on=True)
    assert ref["counters"] == {}
    assert got["counters"].get("mlp_rewritten") == 2
    # the model returns its logits: the head is left alone in this mode (see NOTE [inductor-pass mode])
    assert got["counters"].get("head_skipped") == 1
    torch.testing.assert_close(torch.tensor(got["loss"]), torch.tensor(ref["loss"]), rtol=1e-4, atol=1e-5)


def _data_with_extra_column(n=8, seq=24):
    # a key the model's forward does not take: Trainer's column filter (default arguments) must drop it
    return [dict(row, row=i) for i, row in enumerate(_data(n, seq))]


def _train_default_args(tmp_path, model):
    targs = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=targs, train_dataset=_data_with_extra_column())
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _in_place(model, backend, **kw):
    model.compile(backend=backend, **kw)
    return model


def test_trainer_with_in_place_mst_compile_and_default_arguments_matches_inductor(tmp_path):
    """One line, ``model.compile(backend="mst")``: Trainer keeps the model itself, so its column filter reads the
    real ``forward`` signature (no ``remove_unused_columns=False``), and the head is chunked with the logits
    returned (``logits="full"``), which the Inductor-pass mode cannot do."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    ref = _train_default_args(tmp_path / "a", _in_place(zoo.build("llama"), "inductor"))
    torch._dynamo.reset()
    counters.clear()
    mst_compile.reset_counters()
    got = _train_default_args(tmp_path / "b", _in_place(zoo.build("llama"), "mst", options={"num_chunks": 3}))
    assert counters["frames"]["ok"] > 0
    assert mst_compile.counters["mlp_rewritten"] == 2 and mst_compile.counters["head_rewritten"] == 1
    assert len(got) == len(ref) == 3
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-4, atol=1e-5)
