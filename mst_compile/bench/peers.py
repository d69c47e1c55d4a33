"""Peer approaches for the benchmark, written against an HF Llama from ``models.build_llama``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _shifted(ids):
    labels = F.pad(ids, (0, 1), value=-100)[..., 1:]
    return labels.reshape(-1)


def linear_ce_loss(model):
    """The model's hidden states, then ``F.linear_cross_entropy`` with its chunked options (compiled)."""
    from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions

    opts = LinearCrossEntropyOptions()

    def fn(ids):
        h = model.model(input_ids=ids).last_hidden_state
        return F.linear_cross_entropy(h.reshape(-1, h.shape[-1]), model.lm_head.weight, _shifted(ids),
                                      ignore_index=-100, options=opts)  # fmt: skip

    return fn


def paper_loss(model, mlp_chunks: int = 8, head_chunks: int = 16):
    """The Mini-Sequence Transformer paper's approach by hand, in eager: each MLP and the head run over
    mini-sequences with ``checkpoint`` per chunk; gradients are correct (the head's mean is a sum over chunks
    divided by the count of labels, not a mean of means)."""
    for layer in model.model.layers:
        mlp = layer.mlp
        if getattr(mlp, "_mst_by_hand", False):
            continue
        inner = mlp.forward

        def chunked(x, inner=inner):
            parts = [checkpoint(inner, c, use_reentrant=False) for c in x.chunk(mlp_chunks, dim=1)]
            return torch.cat(parts, dim=1)

        mlp.forward, mlp._mst_by_hand = chunked, True

    def head(h, y):
        return F.cross_entropy(model.lm_head(h).float(), y, ignore_index=-100, reduction="sum")

    def fn(ids):
        h = model.model(input_ids=ids).last_hidden_state
        h, y = h.reshape(-1, h.shape[-1]), _shifted(ids)
        total = sum(checkpoint(head, hc, yc, use_reentrant=False)
                    for hc, yc in zip(h.chunk(head_chunks), y.chunk(head_chunks)))  # fmt: skip
        return total / (y != -100).sum()

    return fn
