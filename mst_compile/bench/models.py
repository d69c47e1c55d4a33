"""Models the benchmark and the memory tests build from a config (random weights, no downloads)."""

from __future__ import annotations

import torch

CONFIGS = {
    # the benchmark's reference model: 2-layer Llama, H=512, I=2048, V=32000
    "llama-small": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=8,
                        num_key_value_heads=8, vocab_size=32000),
    # the CI memory-ratio test: logits (tokens x 8192 fp32) dominate as in the real thing, compiles in seconds
    "llama-mem": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=8192),
    # a large vocabulary relative to the hidden size (Qwen2-like: V=151936, tied embeddings, GQA)
    "qwen-vocab": dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=2, num_attention_heads=8,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    # examples/train_long_context.py's model at --hidden 128: byte-level vocabulary, the MLP is the big layer
    "byte-llama": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=256),
    # the memory tests' large-vocabulary model: a 512-token chunk of its fp32 logits is 128 MiB (> 64: the
    # automatic policy's minimum chunk drops to 256 tokens, NOTE [minimum chunk]); tied like Qwen2
    "vocab-mem": dict(hidden_size=64, intermediate_size=224, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=65536, tie_word_embeddings=True),
    # small enough for unit tests
    "llama-tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=4096),
}  # fmt: skip


def build_llama(name: str = "llama-small", seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**CONFIGS[name], "use_cache": False, **overrides})
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def token_batch(tokens: int, vocab: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, tokens // batch), generator=g)
