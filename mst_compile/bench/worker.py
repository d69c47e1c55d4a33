"""One benchmark arm in its own process; prints one JSON line (peak MiB, step times, compile time).

    python -m mst_compile.bench.worker --arm mst --form step --tokens 8192
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from .. import _compat
from ..recipes import trace_checkpointed_layers
from .cli import parser
from .measure import PeakMeter
from .models import build_llama, token_batch

ARMS = ("eager", "compile", "auto_chunker", "hf_ckpt", "compile_ckpt", "mst", "mst_ckpt")
#: more peers: activation-memory budgets, a tuned auto_chunker, a model variant calling
#: F.linear_cross_entropy with its chunked options, and the paper's approach written by hand (eager)
EXTRA_ARMS = ("budget_0.5", "budget_0.1", "auto_chunker_tuned", "auto_chunker_n8", "auto_chunker_n32", "linear_ce",
              "paper")  # fmt: skip
#: arms that are a loss function, not a model: the step form only
STEP_ONLY = ("linear_ce", "paper")
FORMS = ("step", "model")


def prepare(arm: str, form: str, model, options: dict | None = None):
    """The callable ``ids -> loss (and the output object kept alive)`` for one arm and form."""
    if arm in ("hf_ckpt", "compile_ckpt", "mst_ckpt") and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if arm != "hf_ckpt":  # both compiled arms: NOTE [checkpointed layer tracing]
            trace_checkpointed_layers(model)
    if arm.startswith("auto_chunker"):
        _compat.inductor_config().auto_chunker.enable = True
    if arm.startswith("auto_chunker_"):  # tuned: a lower amplification threshold, 16 (or 8, 32) chunks
        _compat.inductor_config().auto_chunker.amplify_ratio_threshold = 2
        _compat.inductor_config().auto_chunker.num_chunk = int(arm[14:]) if arm.startswith("auto_chunker_n") else 16
    if arm.startswith("budget_"):
        _compat.functorch_config().activation_memory_budget = float(arm.split("_")[1])
    if arm in ("linear_ce", "paper"):
        from .peers import linear_ce_loss, paper_loss

        fn = linear_ce_loss(model) if arm == "linear_ce" else paper_loss(model)
        target = torch.compile(fn) if arm == "linear_ce" else fn
        return lambda ids: (target(ids), None)
    backend = "inductor" if arm in ("compile", "compile_ckpt") or arm.startswith(("auto_chunker", "budget_")) else None
    if arm in ("mst", "mst_ckpt"):
        backend = "mst"
    kwargs = {"options": options} if (backend == "mst" and options) else {}
    nano = not hasattr(model, "config")  # the plain nanoGPT: model(idx, targets) -> (loss, logits)

    if form == "model":
        target = model if backend is None else torch.compile(model, backend=backend, **kwargs)

        def run(ids):
            out = target(input_ids=ids, labels=ids) if not nano else target(ids, ids)
            return (out.loss, out) if not nano else (out[0], out)

    else:

        def loss_fn(ids):
            return model(input_ids=ids, labels=ids).loss if not nano else model(ids, ids)[0]

        target = loss_fn if backend is None else torch.compile(loss_fn, backend=backend, **kwargs)

        def run(ids):
            return target(ids), None

    return run


def build_step(arm: str, form: str, model_name: str, tokens: int, options: str = "", device: str = "cpu",
               dtype: str = "float32"):  # fmt: skip
    """The model (seed 0, train mode) and ``step() -> loss``: one forward and backward of ``arm`` on ``tokens``
    tokens, gradients cleared after. ``model_name``: a ``models.CONFIGS`` name, ``zoo:<arch>`` or ``moe:<arch>[:<impl>]``;
    ``options``: mst's options as JSON."""
    torch.manual_seed(0)
    if model_name.startswith("zoo:"):  # zoo:<arch>: an architecture of the zoo at 8x its test size, V=32000
        from . import zoo

        model = zoo.build(model_name[4:], scale=8, vocab=32000).to(device, getattr(torch, dtype))
    elif model_name.startswith("moe:"):  # moe:<arch>[:<experts implementation>]: the tiny MoE of bench/moe.py
        from . import moe

        model = moe.build(*model_name[4:].split(":")).to(device, getattr(torch, dtype))
    else:
        model = build_llama(model_name).to(device, getattr(torch, dtype))
    model.train()
    vocab = model.config.vocab_size if hasattr(model, "config") else model.lm_head.out_features
    ids = token_batch(tokens, vocab).to(device)
    run = prepare(arm, form, model, json.loads(options) if options else None)

    def step():
        loss, out = run(ids)
        loss.backward()
        del out
        model.zero_grad(set_to_none=True)
        return float(loss.detach())

    return model, step


def main(argv=None) -> None:
    p = parser("python -m mst_compile.bench.worker", __doc__)
    p.add_argument("--arm", choices=ARMS + EXTRA_ARMS, required=True, help="what compiles the step")
    p.add_argument("--form", choices=FORMS, default="step", help="step: a function returning the loss; model: the model "
                   "(logits returned too)")
    p.add_argument("--model", default="llama-small", help="a model of bench/models.py, or zoo:ARCH")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per step (batch 1)")
    p.add_argument("--steps", type=int, default=3, help="measured steps after the warm-up steps")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps (the first one compiles)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--dtype", default="float32", help="parameter dtype")
    p.add_argument("--options", default="", help="mst options as JSON")
    a = p.parse_args(argv)
    model, step = build_step(a.arm, a.form, a.model, a.tokens, a.options, a.device, a.dtype)
    t0 = time.perf_counter()
    losses = [step()]
    compile_s = time.perf_counter() - t0
    losses += [step() for _ in range(a.warmup - 1)]
    times = []
    for _ in range(a.steps):
        if a.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with PeakMeter(a.device) as meter:
            losses.append(step())
        times.append(time.perf_counter() - t)
    result = dict(
        arm=a.arm, form=a.form, tokens=a.tokens, model=a.model, device=a.device, peak_mib=round(meter.peak_mib, 1),
        step_s_median=statistics.median(times), step_s=times, compile_s=compile_s, loss=losses[-1],
    )  # fmt: skip
    from .floor import floor_mib

    ckpt, logits_out = a.arm.endswith("ckpt"), a.form == "model"
    recompute = "none"
    if a.arm.startswith("mst"):
        from ..config import resolve

        recompute = resolve(json.loads(a.options) if a.options else None).recompute
    result["floor_mib"] = floor_mib(model, a.tokens, ckpt, logits_returned=logits_out, recompute=recompute)
    if a.arm.startswith("mst"):
        import mst_compile

        result["rewritten"] = mst_compile.counters["mlp_rewritten"] + mst_compile.counters["head_rewritten"]
        result["masks_rewritten"] = mst_compile.counters["mask_rewritten"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
