"""The analytic memory estimate of one training step, printed next to each measured peak ("estimate" in the
benchmark's table and plot; the functions keep the name ``floor`` and the results the key ``floor_mib``).

estimate = gradients of the trainable parameters
         + the activations that must be saved for backward
         + one chunk's intermediate (the largest of: one head chunk's fp32 logits, one MLP chunk's widened tensors).

Activations, per decoder layer of a Llama-style model, per token (``H`` hidden, ``Hkv`` key/value width):
the layer input and the two norm outputs that feed projections (3 H), q, k, v after RoPE (H + 2 Hkv), the
attention output (H) and its log-sum-exp (one fp32 per head), the residual after attention (H): ``6 H + 2 Hkv``.
The chunked MLP saves only its input (a norm output, counted) and the fused head saves the gradient of its
input instead of the input (same size), plus the final norm's input and output (2 H). With per-layer gradient
checkpointing only each layer's input is kept, and one layer's set is alive again while it is recomputed.
With mst's selective recompute (NOTE [selective recompute], ``recompute=``) the norm outputs (``"norms"``) and
also q, k, v (``"attention"``) are recomputed in backward instead of saved: the per-layer set drops to
``4 H + 2 Hkv`` and ``3 H``, and ``"attention"`` adds one layer's q, k, v (``H + 2 Hkv``), which exist again while
that layer's attention backward runs.
Nothing of ``tokens x intermediate`` or ``tokens x vocab`` is in the floor: those are what chunking removes.
In the model form the returned logits (``tokens x vocab`` in the model dtype) are an output the caller holds, so
they are in the floor too. Parameters are not counted: they exist before the step (the measured peak is the
step's growth above its start).

It is a sum of the terms, not a lower bound: not every term is alive at the same moment (most weight gradients
appear in backward, as the saved activations are freed), so at short lengths, where the gradients dominate, a
measured peak can be below it; at long lengths the activations dominate and it is close.
"""

from __future__ import annotations


import torch

from ..config import MSTConfig
from ..ops.accumulate import accumulator_bytes
from ..ops.linear_ce import chunk_logit_bytes, whole_logit_bytes
from ..plan import chunk_plan

MIB = 2**20


def _cfg(model):
    c = getattr(model, "config", None)
    if c is None or not hasattr(c, "hidden_size") or not hasattr(c, "intermediate_size"):
        return None
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    return c.hidden_size, heads * head_dim, kv * head_dim, heads, c.intermediate_size, c.num_hidden_layers, c.vocab_size


def mlp_row_bytes(inter: int, elem: int) -> int:
    """One token's widened tensors in a SwiGLU chunk, as the MLP pass counts them: gate, up, the activation and
    the product."""
    return 4 * inter * elem


def chunk_rows(tokens: int, hidden: int, width: int, row_bytes: int, fixed_bytes: int = 0,
               whole_row_bytes: int | None = None) -> int:  # fmt: skip
    """Rows in the first (largest) chunk under mst's automatic policy on the CPU (``plan.chunk_plan``, the one
    the passes use): ``width / hidden`` chunks, never fewer than the policy's minimum tokens each; all the
    tokens when the region is left whole."""
    plan = chunk_plan(MSTConfig(), rows=tokens, input_size=hidden, wide_size=width, row_bytes=row_bytes,
                      fixed_bytes=fixed_bytes, whole_row_bytes=whole_row_bytes)  # fmt: skip
    return tokens if plan.whole else plan.rows_in_first_chunk(tokens)


def floor_mib(model, tokens: int, checkpointing: bool = False, logits_returned: bool = False,
              recompute: str = "none") -> float | None:  # fmt: skip
    """The floor in MiB for ``tokens`` tokens (batch 1), or ``None`` when the model is not Llama-shaped;
    ``recompute``: what backward recomputes (mst's option of that name; ``"none"`` for every other arm)."""
    shape = _cfg(model)
    if shape is None:
        return None
    h, q_width, kv_width, heads, inter, layers, vocab = shape
    p = next(model.parameters())
    elem = p.element_size()
    grads = sum(x.numel() * x.element_size() for x in model.parameters() if x.requires_grad)
    qkv = tokens * (q_width + 2 * kv_width) * elem
    norms = 0 if recompute in ("norms", "attention") else 2 * h
    per_layer = tokens * ((h + norms + q_width + h) * elem + heads * 4) + (0 if recompute == "attention" else qkv)
    final = tokens * 2 * h * elem + (qkv if recompute == "attention" else 0)
    saved = (layers * tokens * h * elem + per_layer) if checkpointing else layers * per_layer
    # the head's plan as the pass makes it (NOTE [tail temporaries], NOTE [chunking pays])
    head_bytes, head_whole = vocab * chunk_logit_bytes(elem, False), vocab * whole_logit_bytes(elem)
    acc = accumulator_bytes([torch.empty((vocab, h), dtype=p.dtype, device="meta")])
    head_rows = chunk_rows(tokens, h, vocab * 4 // elem, head_bytes, acc, head_whole)
    head = tokens * head_whole if head_rows == tokens else head_rows * head_bytes
    mlp_bytes = mlp_row_bytes(inter, elem)
    mlp_rows = chunk_rows(tokens, h, 2 * inter, mlp_bytes)
    chunk = max(head, mlp_rows * mlp_bytes)
    out = tokens * vocab * elem if logits_returned else 0
    return (grads + saved + final + chunk + out) / MIB
