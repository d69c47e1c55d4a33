"""Logits returned next to a fused loss, rebuilt outside the compiled graph (see NOTE [returned logits]).

``bridge``: the compiled graph returns the logits without autograd history plus ``h``, ``w`` (and ``b``);
:class:`_LogitsGrad` re-attaches a gradient path. Its backward runs only when the user differentiates the
logits, recomputing them chunk by chunk (``mst::rowwise_backward``); it never materializes a zero gradient.
``skip``: the slot holds a :class:`SkippedLogits`, which raises on any use.
"""

from __future__ import annotations

import torch

from .ops.spec import RowwiseSpec, parse


class _LogitsGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, h, w, b, spec):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(h, w, b)
        ctx.spec = spec
        # NOTE [logits edited in place]: a fresh tensor over the same storage, not a view of the input: a view
        # made inside a custom Function may not be modified in place (autograd forbids it), while eager's logits
        # may be (``logits.mul_(2)``). The compiled graph holds no other reference to this buffer.
        return logits.detach()

    @staticmethod
    def backward(ctx, g):
        h, w, b = ctx.saved_tensors
        if g is None:
            return (None,) * 5
        params = [w] if b is None else [w, b]
        needs = list(ctx.needs_input_grad[1 : 2 + len(params)])
        res = torch.ops.mst.rowwise_backward(g.reshape(-1, g.shape[-1]), h.reshape(-1, h.shape[-1]), params, ctx.spec,
                                             needs)  # fmt: skip
        gh = res[0].view_as(h) if needs[0] else None
        gw = res[1] if needs[1] else None
        gb = res[2] if b is not None and needs[2] else None
        return None, gh, gw, gb, None


class SkippedLogits(torch.Tensor):
    """Stands where the logits would be when ``logits="skip"``: has their shape and dtype, raises on use."""

    @staticmethod
    def __new__(cls, shape, dtype, device):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(
            "mst: the logits were not materialized because the model computed its loss and the backend "
            "runs with options={'logits': 'skip'}. Use options={'logits': 'full'} (the default) to get them."
        )

    def __repr__(self, *, tensor_contents=None):
        return f"SkippedLogits(shape={tuple(self.shape)}, dtype={self.dtype}) [not materialized by mst]"


def rebuild_outputs(outs, logits_outputs) -> list:
    """Strip the extra outputs the head pass appended and rebuild each logits slot."""
    outs = list(outs)
    n_extra = sum(len(lo.extra) for lo in logits_outputs)
    extras = outs[len(outs) - n_extra :] if n_extra else []
    base = len(outs) - n_extra
    result = outs[:base]
    for lo in logits_outputs:
        ex = [extras[i - base] for i in lo.extra]
        for slot in lo.slots:
            if lo.mode == "bridge":
                h, w = ex[0], ex[1]
                b = ex[2] if len(ex) > 2 else None
                result[slot] = _LogitsGrad.apply(result[slot], h, w, b, lo.spec)
            elif lo.mode == "skip":
                h = ex[0]
                body = parse(parse(lo.spec, RowwiseSpec).body)  # NOTE [body spec]: the logits' width and dtype
                result[slot] = SkippedLogits((*h.shape[:-1], body.out_features), body.dtype, h.device)
    return result
