"""One arm of the mixture-of-experts memory check in its own process; prints one JSON line.

    MALLOC_MMAP_THRESHOLD_=65536 python -m mst_compile.bench.moe --arm mst --arch mixtral --impl grouped_mm
    ... --arch qwen3_moe --dtype bfloat16

A tiny MoE causal LM (hidden 64, intermediate 512, 8 experts, top-2, 2 layers, vocabulary 1000; the router's
load-balancing loss on) compiled as a step function ``ids -> loss``; the peak of a step after the warm-up
(``PeakMeter``: RSS above the step's start on the CPU).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from .measure import PeakMeter

SIZES = dict(hidden_size=64, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=1000, use_cache=False, output_router_logits=True, router_aux_loss_coef=0.02)  # fmt: skip
#: the expert sizes under each architecture's own names
EXPERTS = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=512, decoder_sparse_step=1,
                      norm_topk_prob=True),
}  # fmt: skip


def build(arch: str = "mixtral", impl: str = "grouped_mm", seed: int = 0, **overrides) -> torch.nn.Module:
    """The tiny MoE model of ``arch`` with the experts implementation ``impl``, in train mode."""
    import transformers

    cfg = transformers.AutoConfig.for_model(arch, **{**SIZES, **EXPERTS[arch], **overrides})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg, experts_implementation=impl).train()


def main(argv=None) -> None:
    p = argparse.ArgumentParser("python -m mst_compile.bench.moe", description=__doc__)
    p.add_argument("--arm", choices=("compile", "mst"), required=True, help="compile: backend='inductor'")
    p.add_argument("--arch", choices=sorted(EXPERTS), default="mixtral")
    p.add_argument("--impl", choices=("grouped_mm", "batched_mm", "eager"), default="grouped_mm",
                   help="experts implementation (eager: HF's loop over the experts hit)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch 1)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps (the first one compiles)")
    p.add_argument("--options", default="", help="mst options as JSON")
    p.add_argument("--dtype", default="float32", help="parameter dtype (float32, bfloat16)")
    p.add_argument("--checkpointing", action="store_true",
                   help="HF gradient checkpointing (non-reentrant) with recipes.trace_checkpointed_layers, both arms")
    a = p.parse_args(argv)
    model = build(a.arch, a.impl).to(getattr(torch, a.dtype))
    if a.checkpointing:
        from ..recipes import trace_checkpointed_layers

        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trace_checkpointed_layers(model)  # NOTE [checkpointed layer tracing]: one graph for either arm
    ids = torch.randint(0, SIZES["vocab_size"], (1, a.tokens), generator=torch.Generator().manual_seed(0))

    def loss_fn(ids):
        return model(input_ids=ids, labels=ids).loss

    kwargs = {"options": json.loads(a.options)} if a.arm == "mst" and a.options else {}
    fn = torch.compile(loss_fn, backend="inductor" if a.arm == "compile" else "mst", **kwargs)

    def step():
        loss = fn(ids)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss.detach())

    t0 = time.perf_counter()
    losses = [step()]
    compile_s = time.perf_counter() - t0
    losses += [step() for _ in range(a.warmup - 1)]
    t = time.perf_counter()
    with PeakMeter("cpu") as meter:
        losses.append(step())
    result = dict(arm=a.arm, arch=a.arch, impl=a.impl, dtype=a.dtype, tokens=a.tokens, peak_mib=round(meter.peak_mib, 1),
                  step_s=time.perf_counter() - t, compile_s=compile_s, loss=losses[-1],
                  checkpointing=a.checkpointing)  # fmt: skip
    if a.arm == "mst":
        import mst_compile

        result["moe_rewritten"] = mst_compile.counters["moe_rewritten"]
        result["head_rewritten"] = mst_compile.counters["head_rewritten"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
