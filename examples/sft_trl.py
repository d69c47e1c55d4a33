"""Fine-tune with TRL's ``SFTTrainer`` or HF ``Trainer`` on mst, with no model edits (random-init, no downloads).

    python examples/sft_trl.py                                  # SFTTrainer, mst, default loss
    python examples/sft_trl.py --backend inductor               # the same run under Inductor, for the A/B
    python examples/sft_trl.py --setup padding_free             # also: nll, packing, ga, completion_only
    python examples/sft_trl.py --framework trainer              # HF Trainer
    python examples/sft_trl.py --framework trainer --compile args --backend inductor   # + MST_INDUCTOR_PASS=1
    python examples/sft_trl.py --model llama-mem --tokens 2048 --steps 3               # the README's memory row

The recipe is one line: ``model.compile(backend="mst")`` before the trainer is built. It compiles the module in
place, so the trainer still holds the model itself: TRL's fused LM head (``add_fused_lm_head`` replaces
``model.forward``) and Trainer's column filter (which reads ``forward``'s signature) see the real model, and every
call still goes through Dynamo. ``torch.compile(model, ...)`` returns a wrapper instead, whose forward TRL replaces
with a function that calls the wrapped (uncompiled) model: nothing would be compiled (``--compile wrap`` shows it).
SFTTrainer checkpoints every layer by default; since transformers 5.25 Dynamo (with any backend) runs those layers
eagerly unless ``mst_compile.recipes.trace_checkpointed_layers(model)`` was called once (the script does, for
both arms).

Prints one loss per step, mst's counters, Dynamo's frame counts and the peak MiB of the last step above its start
(``mst_compile.bench.measure.PeakMeter``; on the CPU the script runs itself again with ``MALLOC_MMAP_THRESHOLD_``
set, which that measurement needs), then the same as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

SETUPS = ("default", "nll", "padding_free", "packing", "ga", "completion_only")


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--framework", choices=("trl", "trainer"), default="trl")
    p.add_argument("--backend", choices=("mst", "inductor", "aot_eager", "eager", "none"), default="mst",
                   help="none: nothing compiled (the eager reference; no Dynamo tracing)")
    p.add_argument("--mst-compiler", choices=("inductor", "aot_eager"), default="inductor",
                   help="what compiles mst's rewritten graph (aot_eager: no code generation, the quick A/B against "
                        "--backend aot_eager)")  # fmt: skip
    p.add_argument("--compile", choices=("inplace", "wrap", "args"), default="inplace",
                   help="inplace: model.compile(backend=...); wrap: torch.compile(model, backend=...); args: "
                        "TrainingArguments(torch_compile=True, torch_compile_backend=...) (mst then needs "
                        "MST_INDUCTOR_PASS=1 and --backend inductor)")  # fmt: skip
    p.add_argument("--setup", choices=SETUPS, default="default")
    p.add_argument("--model", default="llama", help="llama: mst_compile.bench.zoo's tiny Llama; or a config of "
                   "mst_compile.bench.models (llama-mem, llama-tiny, ...)")  # fmt: skip
    p.add_argument("--tokens", type=int, default=64, help="tokens per row")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-chunks", type=int, default=None, help="mst's num_chunks option (default: automatic)")
    p.add_argument("--out", default=None, help="Trainer output_dir (default: a temporary folder)")
    return p.parse_args(argv)


def _tokenizer(vocab: int):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    word_level = models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t3")
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(word_level), pad_token="t0", bos_token="t1",
                                   eos_token="t2", unk_token="t3")  # fmt: skip


def _rows(a, vocab: int, n: int):
    """``n`` random token rows; packing and padding-free get rows of different lengths (their point)."""
    import torch

    g = torch.Generator().manual_seed(0)
    vary = a.setup in ("padding_free", "packing")
    lengths = [a.tokens - (i % 3) * (a.tokens // 8) if vary else a.tokens for i in range(n)]
    return [torch.randint(3, vocab, (t,), generator=g).tolist() for t in lengths]


def _build_model(a):
    from mst_compile.bench import models, zoo

    if a.model in zoo.ARCHS:
        return zoo.build(a.model)
    m = models.build_llama(a.model)
    m.config.pad_token_id, m.config.bos_token_id, m.config.eos_token_id = 0, 1, 2
    return m.train()


class _StepPeaks:
    """A ``TrainerCallback`` measuring each optimizer step's peak with ``PeakMeter``."""

    def __init__(self, device: str):
        from transformers import TrainerCallback

        from mst_compile.bench.measure import PeakMeter

        peaks, meter = [], [None]

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                meter[0] = PeakMeter(device).__enter__()

            def on_step_end(self, args, state, control, **kw):
                meter[0].__exit__(None, None, None)
                peaks.append(round(meter[0].peak_mib, 1))

        self.callback, self.peaks = CB(), peaks


def run(a) -> dict:
    import tempfile

    import torch
    from torch._dynamo.utils import counters as dynamo_counters

    import mst_compile

    warnings.filterwarnings("ignore", category=FutureWarning)
    model = _build_model(a)
    vocab = model.config.vocab_size
    device = "cuda" if torch.cuda.is_available() else "cpu"
    options = {} if a.num_chunks is None else {"num_chunks": a.num_chunks}
    if a.mst_compiler != "inductor":
        options["compiler"] = a.mst_compiler
    kw = {"options": options} if a.backend == "mst" else {}
    if a.backend == "none":
        pass  # the eager reference: the model as it is
    elif a.compile == "inplace":
        model.compile(backend=a.backend, **kw)  # the recipe: the trainer keeps the model itself
    elif a.compile == "wrap":
        model = torch.compile(model, backend=a.backend, **kw)
    elif a.num_chunks is not None:
        mst_compile.set_config(num_chunks=a.num_chunks)
    common = dict(output_dir=a.out or tempfile.mkdtemp(prefix="sft_trl_"), max_steps=a.steps,
                  per_device_train_batch_size=a.batch, learning_rate=a.lr, logging_steps=1, save_strategy="no",
                  report_to=[], seed=0, use_cpu=device == "cpu",
                  gradient_accumulation_steps=2 if a.setup == "ga" else 1)  # fmt: skip
    if a.compile == "args" and a.backend != "none":
        common.update(torch_compile=True, torch_compile_backend=a.backend)
    peaks = _StepPeaks(device)
    n_rows = a.batch * a.steps * (2 if a.setup == "ga" else 1)
    rows = _rows(a, vocab, n_rows)
    if a.framework == "trl":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        cols = {"input_ids": rows}
        if a.setup == "completion_only":  # pre-tokenized prompt + completion: the loss on the second half only
            cols["completion_mask"] = [[0] * (len(r) // 2) + [1] * (len(r) - len(r) // 2) for r in rows]
        setup = {"nll": {"loss_type": "nll"}, "padding_free": {"padding_free": True}, "packing": {"packing": True},
                 "completion_only": {"completion_only_loss": True}}.get(a.setup, {})  # fmt: skip
        # packing fills rows of max_length tokens from the shorter rows (TRL's BFD packing, padding-free batches)
        max_length = a.tokens * a.batch if a.setup == "packing" else None
        args = SFTConfig(**common, max_length=max_length, **setup)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict(cols),
                             processing_class=_tokenizer(vocab), callbacks=[peaks.callback])  # fmt: skip
    else:
        from transformers import Trainer, TrainingArguments

        if a.setup != "default" and a.setup != "ga":
            raise SystemExit(f"--setup {a.setup} is a TRL setup; HF Trainer takes default or ga")
        # an extra column the model does not take: Trainer's column filter must drop it (default arguments)
        data = [{"input_ids": torch.tensor(r), "labels": torch.tensor(r), "row": i} for i, r in enumerate(rows)]
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=data,
                          callbacks=[peaks.callback])  # fmt: skip
    if trainer.args.gradient_checkpointing:  # TRL's default; on transformers >= 5.25 the layers need the recipe
        mst_compile.recipes.trace_checkpointed_layers(model)  # with any backend (NOTE [checkpointed layer tracing])
    batch_keys = sorted(next(iter(trainer.get_train_dataloader())))
    trainer.train()
    return {
        "framework": a.framework, "backend": a.backend, "compile": a.compile, "setup": a.setup, "model": a.model,
        "tokens": a.tokens, "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "peak_mib": peaks.peaks, "counters": dict(mst_compile.counters), "frames": dict(dynamo_counters["frames"]),
        "batch_keys": batch_keys, "loss_type": getattr(trainer.args, "loss_type", None),
        "inductor_pass": os.environ.get("MST_INDUCTOR_PASS", ""),
    }  # fmt: skip


def main(argv=None):
    a = _args(argv)
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ and argv is None:
        # CPU peaks are only right when freed blocks go back to the OS (mst_compile/bench/measure.py)
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    res = run(a)
    for i, loss in enumerate(res["loss"]):
        print(f"step {i + 1} loss {loss:.6f} peak {res['peak_mib'][i] if i < len(res['peak_mib']) else '-'} MiB")
    print(f"mst counters {res['counters']}, Dynamo frames {res['frames']}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
