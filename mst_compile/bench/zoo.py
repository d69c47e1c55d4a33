"""Tiny random-init causal LMs of many architectures (no downloads), for tests and the architecture table.

    python -m mst_compile.bench.zoo        # regions rewritten and parity with eager, per architecture
"""

from __future__ import annotations

import torch

H, I, V, L = 32, 96, 320, 2
_COMMON = dict(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=V, use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip

# name -> (config class, model class, config overrides); None overrides the common key away
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 30.0}),
    # a 16-token sliding window: any longer sequence builds a real (non-causal) mask, left alone by mst
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8, "sliding_window": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": H, "n_layer": L, "n_head": 4, "n_inner": 4 * H,
                                               "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
}


#: More decoder-only causal LMs of the installed transformers, built through ``AutoConfig.for_model`` with the
#: same tiny sizes, and how many MLP regions each must get rewritten: 0 where the MLP is not a supported shape
#: (mixture-of-experts blocks, which the MoE pass chunks and counts as ``moe`` regions; Bloom's autograd.Function
#: GELU, Apertus' xIELU with its own branches); those must still compile exactly.
AUTO_ARCHS = {
    "olmo": L, "olmo2": L, "olmo3": L, "stablelm": L, "cohere": L, "glm": L, "granite": L, "phi": L,
    "starcoder2": L, "gpt_bigcode": L, "persimmon": L, "nemotron": L, "helium": L, "smollm3": L, "exaone4": L,
    "ernie4_5": L, "seed_oss": L, "arcee": L, "hunyuan_v1_dense": L, "ministral": L, "gemma3_text": L, "opt": L,
    "mixtral": 0, "qwen3_moe": 0, "bloom": 0, "apertus": 0,
}  # fmt: skip


def build_auto(model_type: str, seed: int = 0) -> torch.nn.Module:
    import transformers

    cfg = transformers.AutoConfig.for_model(model_type, **_COMMON, head_dim=8)
    for k in list(cfg.to_dict()):  # no dropout: eager and compiled runs must draw nothing at random
        if ("dropout" in k or "pdrop" in k) and isinstance(getattr(cfg, k, None), float):
            setattr(cfg, k, 0.0)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).train()
    if getattr(model, "loss_type", "") is None:
        model.loss_type = "ForCausalLM"
    return model


def build(name: str, seed: int = 0, scale: int = 1, vocab: int = V) -> torch.nn.Module:
    """A tiny model of architecture ``name`` (``ARCHS`` or ``"nanogpt"``), in train mode.

    ``scale`` multiplies the hidden and intermediate sizes (the benchmark's architecture table uses 8)."""
    torch.manual_seed(seed)
    h, i = H * scale, I * scale
    if name == "nanogpt":
        from .nanogpt import NanoGPT

        return NanoGPT(vocab=vocab, dim=h, layers=L, heads=4, max_len=32768).train()
    import transformers

    cfg_name, model_name, over = ARCHS[name]
    kw = dict(_COMMON, **over, hidden_size=h, intermediate_size=i, vocab_size=vocab)
    if name == "gpt2":
        over = dict(over, n_embd=h, n_inner=4 * h, n_positions=32768)
        kw = dict(vocab_size=vocab, use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2, **over)
    cfg = getattr(transformers, cfg_name)(**kw)
    model = getattr(transformers, model_name)(cfg).train()
    if getattr(model, "loss_type", "") is None:
        # GPT2LMHeadModel has no loss_type; HF then logs a warning inside forward, which is a graph break
        # between the head and its loss under any torch.compile backend (mst reports the head as skipped).
        model.loss_type = "ForCausalLM"
    return model


def loss_fn(name: str, model, ids, labels):
    """``(loss, logits)`` of one call the way users call each model."""
    if name == "nanogpt":
        return model(ids, labels)
    out = model(input_ids=ids, labels=labels)
    return out.loss, out.logits


def main() -> None:
    import mst_compile

    ids = torch.randint(0, V, (2, 17))
    print(f"{'arch':<10} {'mlp':>4} {'head':>5} {'skipped':>8}  parity(loss, grads)")
    for name in [*ARCHS, "nanogpt"]:
        model = build(name)
        ref_loss, _ = loss_fn(name, model, ids, ids)
        ref_loss.backward()
        ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        mst_compile.reset_counters()
        torch.compiler.reset()
        cm = torch.compile(model, backend="mst", options={"num_chunks": 3, "compiler": "aot_eager"})
        loss, _ = loss_fn(name, cm, ids, ids)
        loss.backward()
        err = max(
            ((p.grad - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-12)).item()
            for n, p in model.named_parameters() if p.grad is not None
        )  # fmt: skip
        c = mst_compile.counters
        skipped = c["mlp_skipped"] + c["head_skipped"]
        print(f"{name:<10} {c['mlp_rewritten']:>4} {c['head_rewritten']:>5} {skipped:>8}  "
              f"{abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()):.1e}, {err:.1e}")  # fmt: skip
        for rep in mst_compile.reports():
            for r in rep.skipped():
                print(f"{'':<10} skipped {r.kind} at {r.anchor}: {r.reason}")


if __name__ == "__main__":
    main()
