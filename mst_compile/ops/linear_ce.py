"""``mst::linear_ce``: vocabulary projection + cross-entropy, one mini-sequence at a time.

For each chunk of rows: ``z = linear(h_c, w, b)``; ``logits = pre(z)`` (the value the model may also return,
written into one ``[tokens, vocab]`` buffer in the model's dtype when asked); ``f = post(logits)`` (upcast,
scaling, softcap: whatever row-wise math stands between the projection and the loss);
``cross_entropy(f, y_c, reduction="sum")``.

NOTE [gradient in forward]: the loss is a scalar, so its gradient with respect to ``h``, ``w`` and ``b`` is
known up to the scalar factor that backward brings. When a gradient is needed the op computes it during the
forward chunk loop (one logits GEMM per chunk instead of a second one in backward, no logits kept), returns
it as extra outputs, and backward only scales them. This is the same trick as Liger's fused linear
cross-entropy; the weight gradient is accumulated in place (fp32 for low-precision weights).

The op returns the loss already reduced (``sum`` or ``mean`` over non-ignored labels, NaN for a mean over
none, as eager) and the count of non-ignored labels.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _compat
from . import entry, registry
from .spec import HeadSpec, parse
from .accumulate import GradAccumulator

_EMPTY = (0,)


@torch.library.custom_op("mst::linear_ce", mutates_args=())
def linear_ce(
    h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], labels: torch.Tensor, spec: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``spec``: a :class:`~.spec.HeadSpec` string (NOTE [body spec])."""
    with registry.no_autocast():  # the loop casts to its compute dtype itself (NOTE [autocast])
        return _linear_ce(h, w, b, labels, parse(spec, HeadSpec))


def _linear_ce(h, w, b, labels, head: HeadSpec):
    pre, post = registry.get(head.pre), registry.get(head.post)
    ignore_index, label_smoothing, want_logits = head.ignore_index, head.label_smoothing, head.want_logits
    _check_targets(labels, ignore_index, w.shape[0])
    h, w = h.detach(), w.detach()
    b = None if b is None else b.detach()
    rows = h.shape[0]
    need_h, need_w, need_b = head.needs
    need_b = need_b and b is not None
    grad = need_h or need_w or need_b
    loss_dtype = post.out_dtype or torch.float32  # NOTE [loss dtype]
    ce_dtype = _ce_dtype(loss_dtype)
    loss_sum = torch.zeros((), dtype=ce_dtype, device=h.device)  # fp32 across chunks, whatever the model's dtype
    logits = h.new_empty((rows, w.shape[0]), dtype=pre.out_dtype or h.dtype) if want_logits else h.new_empty(_EMPTY)
    dh = h.new_empty(h.shape) if need_h else h.new_empty(_EMPTY)
    bounds = head.chunks.bounds(rows)
    # NOTE [weight-gradient accumulation]
    dw = GradAccumulator(w, len(bounds)) if need_w else None
    db = GradAccumulator(b, len(bounds)) if need_b else None
    fused = pre.cast_only and post.cast_only
    # (NOTE [autocast]) under autocast the projection runs in the autocast dtype; casting h, w, b once to that
    # "compute dtype" is what autocast does for linear, and the gradient GEMMs then run in it too.
    cd = pre.autocast[1] if pre.autocast else w.dtype
    wc, bc = w.to(cd), None if b is None else b.to(cd)
    zbuf = None
    for s, e in bounds:
        hc = h[s:e].to(cd)
        if fused:
            # one [chunk, vocab] buffer for every chunk's logits (the first chunk is the largest), written by the
            # GEMM ``linear`` calls: a fresh one per chunk is a fresh mapping of its pages on the CPU
            if zbuf is None:
                zbuf = hc.new_empty((e - s, w.shape[0]))
            z = zbuf[: e - s]
            entry.linear(hc, wc, bc, out=z)
            if want_logits:
                logits[s:e] = z
            if post.compiled and e - s > 1 and compiles_cross_entropy(z.dtype, ce_dtype):
                loss, gz = compiled_cross_entropy(z, labels[s:e], ignore_index, label_smoothing, grad)
            else:
                zf = z.to(ce_dtype)
                del z
                loss, gz = fused_cross_entropy(zf, labels[s:e], ignore_index, label_smoothing, grad)
                del zf
            z = None
            gz = None if gz is None else gz.to(cd)
        else:
            z = F.linear(hc, wc, bc)
            loss, gz = _tail_cross_entropy(z, labels[s:e], pre, post, logits[s:e] if want_logits else None,
                                           ignore_index, label_smoothing, grad)  # fmt: skip
            gz = None if gz is None else gz.to(cd)
            del z
        loss_sum += loss.to(ce_dtype)
        if not grad:
            continue
        if need_h:
            torch.matmul(gz, wc, out=dh[s:e]) if dh.dtype == cd else dh[s:e].copy_(gz @ wc)
        if need_w:
            dw.add_mm(gz.t(), hc)
        if need_b:
            db.add(gz.sum(0, dtype=db.acc_dtype))
        del gz  # else this chunk's [rows, vocab] gradient is still alive while the next chunk's logits are made
    zbuf = z = None
    count = (labels != ignore_index).sum()
    loss = (loss_sum / count if head.mean else loss_sum).to(loss_dtype)
    dw = dw.result() if need_w else w.new_empty(_EMPTY)
    db = db.result() if need_b else h.new_empty(_EMPTY)
    return loss, count, dh, dw, db, logits


def _check_targets(labels: torch.Tensor, ignore_index: int, vocab: int) -> None:
    """Eager's error for a label outside ``[0, vocab)`` on the CPU (one pass over the labels; on a GPU the
    gather's device-side assert stands where eager's kernel has its own, with no host synchronization)."""
    if labels.device.type != "cpu":
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        raise IndexError(f"Target {int(labels[bad][0])} is out of bounds.")


def _ce_dtype(loss_dtype: torch.dtype) -> torch.dtype:
    """The dtype a chunk's cross-entropy is computed and summed in: fp32 for low-precision logits (as eager's
    kernels compute internally; the chunk plan counts a chunk's logits at 4 bytes each), else the loss's."""
    return torch.float32 if loss_dtype in (torch.float16, torch.bfloat16) else loss_dtype


def chunk_logit_bytes(elt: int, compiled: bool) -> int:
    """Bytes per logit a chunk of the fused (no-tail) path holds at once (NOTE [tail temporaries]): its fp32
    copy, and for low-precision logits their gradient in that dtype beside it; the compiled cross-entropy
    writes only the gradient next to the logits."""
    return 4 if elt >= 4 else (2 * elt if compiled else 4 + elt)


def whole_logit_bytes(elt: int) -> int:
    """Bytes per logit a whole head with no tail holds under Inductor: the logits and their gradient
    (NOTE [chunking pays])."""
    return 2 * elt


def fused_cross_entropy(zf, y, ignore_index: int, eps: float, grad: bool):
    """Sum of the cross-entropy of rows ``zf`` (modified in place) and, if ``grad``, its gradient w.r.t. ``zf``.

    Same math as ``F.cross_entropy(zf, y, ignore_index, reduction="sum", label_smoothing=eps)``, written as a
    few in-place passes over the chunk so that no ``[rows, vocab]`` temporary besides ``zf`` is made.
    """
    valid = y != ignore_index
    ys = torch.where(valid, y, 0).unsqueeze(1)
    zy = zf.gather(1, ys).squeeze(1)
    zmean = zf.mean(1) if eps else None
    m = zf.amax(1, keepdim=True)
    ssum = zf.sub_(m).exp_().sum(1, keepdim=True)
    lse = (m + ssum.log()).squeeze(1)
    row = lse - zy
    if eps:
        row = (1 - eps) * row + eps * (lse - zmean)
    loss = torch.where(valid, row, 0).sum()
    if not grad:
        return loss, None
    g = zf.div_(ssum)  # softmax
    g.scatter_add_(1, ys, g.new_full(ys.shape, -(1 - eps)))
    if eps:
        g.sub_(eps / zf.shape[1])
    return loss, g.mul_(valid.unsqueeze(1))


def _chunk_cross_entropy(z, y, *, ignore_index: int, eps: float, vocab: int):
    """``fused_cross_entropy``'s math written functionally (fp32 inside, gradient in ``z``'s dtype), for Inductor
    to fuse: a max and an exp-sum over each row, one pass writing the gradient."""
    zf = z.float()
    valid = y != ignore_index
    ys = torch.where(valid, y, 0)
    m = zf.amax(1, keepdim=True)
    ex = (zf - m).exp()
    ssum = ex.sum(1, keepdim=True)
    lse = (m + ssum.log()).squeeze(1)
    row = lse - zf.gather(1, ys.unsqueeze(1)).squeeze(1)
    if eps:
        row = (1 - eps) * row + eps * (lse - zf.mean(1))
    loss = torch.where(valid, row, 0.0).sum()
    hot = torch.arange(vocab, device=z.device).unsqueeze(0) == ys.unsqueeze(1)
    g = ex / ssum - (1 - eps) * hot.to(torch.float32) - eps / vocab
    return loss, (g * valid.unsqueeze(1).to(torch.float32)).to(z.dtype)


def _chunk_cross_entropy_into(z, y, *, ignore_index: int, eps: float, vocab: int):
    """For fp32 logits: the loss, the gradient written over ``z`` itself (Inductor stores the mutated input in
    place), so a chunk holds its logits alone, as the in-place path does."""
    loss, g = _chunk_cross_entropy(z, y, ignore_index=ignore_index, eps=eps, vocab=vocab)
    z.copy_(g)
    return (loss,)


def compiles_cross_entropy(logits_dtype: torch.dtype, ce_dtype: torch.dtype) -> bool:
    """Whether a chunk's cross-entropy runs as Inductor code when bodies are compiled: low-precision logits, and
    fp32 logits whose loss is fp32 (their gradient written over them)."""
    return logits_dtype in (torch.float16, torch.bfloat16) or logits_dtype == ce_dtype == torch.float32


def ce_key(z, y, ignore_index: int, eps: float) -> tuple:
    """What one compiled chunk cross-entropy serves (the row count is a symbol; NOTE [one compiled-body cache])."""
    return ("cross_entropy", z.dtype, z.device.type, z.shape[1], y.dtype, ignore_index, float(eps))


def compiled_cross_entropy(z, y, ignore_index: int, eps: float, grad: bool):
    """A chunk's cross-entropy as Inductor code (NOTE [compiled bodies]): for low-precision logits, the
    gradient it writes (in ``z``'s dtype) replaces the fp32 copy the in-place path makes; fp32 logits get their
    gradient written over them (``z`` is then modified, as the in-place path modifies its copy). One compile per
    dtype, vocabulary, ``ignore_index`` and smoothing, the row count a symbol. Falls back to the in-place path."""
    key = ce_key(z, y, ignore_index, eps)
    into = z.dtype == torch.float32

    def make():
        body = _chunk_cross_entropy_into if into else _chunk_cross_entropy
        f = functools.partial(body, ignore_index=ignore_index, eps=float(eps), vocab=z.shape[1])
        gm = torch.fx.symbolic_trace(lambda z, y: f(z, y))
        with torch.no_grad():
            return registry.compile_body(gm, [z, y], rows_args=(0, 1))

    fn = registry.cached_compile(key, make, "the chunk cross-entropy could not be compiled")
    if fn is not None:
        try:
            with torch.no_grad():
                out = fn(z, y)
            loss, g = (out[0], z) if into else out
            return loss, (g if grad else None)
        except Exception as e:  # noqa: BLE001 - as a compile failure: a missed fusion, never a failed step
            registry.compile_failed(key, "the compiled chunk cross-entropy failed to run", e)
    return fused_cross_entropy(z.float(), y, ignore_index, eps, grad)


def _tail_cross_entropy(z, y, pre, post, logits_out, ignore_index: int, eps: float, grad: bool):
    """Any row-wise tail (softcap, scaling): cross-entropy through autograd, gradient w.r.t. ``z``; the tail,
    the loss and, in backward, their gradient as Inductor code when the head compiles its bodies (NOTE [compiled
    bodies]: one compile per tail, grad mode and dtype, the row count a symbol; a failure runs it op by op)."""
    with _compat.autograd_inside_op(), pre.amp():
        zr = z.requires_grad_(grad)
        if post.compiled and z.shape[0] > 1:
            tail = _tail_body(pre, post, ignore_index, eps, logits_out is not None)
            out = tail.run(zr, y, rows=2)
            lg, loss = out if logits_out is not None else (None, out)
        else:
            lg = pre.fn(zr)
            loss = F.cross_entropy(post.fn(lg), y, ignore_index=ignore_index, reduction="sum", label_smoothing=eps)
        if logits_out is not None:
            logits_out.copy_(lg.detach())
        del lg
        if not grad:
            return loss.detach(), None
        (gz,) = torch.autograd.grad(loss, zr)
    return loss.detach(), gz


_TAILS: dict = {}


def _tail_body(pre, post, ignore_index: int, eps: float, want_logits: bool) -> registry.Body:
    """``(z, y) -> ([pre(z),] cross_entropy(post(pre(z)), y, reduction="sum"))`` as one traced body, compiled
    when run (the row count of ``z`` and ``y`` a symbol)."""
    key = (pre.code, post.code, ignore_index, float(eps), want_logits)
    body = _TAILS.get(key)
    if body is None:
        pre_fn, post_fn = (getattr(b.fn, "forward", b.fn) for b in (pre, post))  # traced inline, not as modules

        def tail(z, y):
            lg = pre_fn(z)
            loss = F.cross_entropy(post_fn(lg), y, ignore_index=ignore_index, reduction="sum", label_smoothing=eps)
            return (lg, loss) if want_logits else loss

        gm = torch.fx.symbolic_trace(tail)
        body = _TAILS[key] = registry.Body(gm, -1, None, gm.code, autocast=pre.autocast, compiled=True, kind="tail")
    return body


@linear_ce.register_fake
def _(h, w, b, labels, spec):
    head = parse(spec, HeadSpec)
    pre, post = parse(head.pre), parse(head.post)  # NOTE [body spec]: no registry lookup in a fake kernel
    need_h, need_w, need_b = head.needs
    # (NOTE [guarded head]) what the pass matched must be what the op computes; a mismatch fails here, at
    # compile time (the backend then falls back), never inside the compiled step.
    torch._check(labels.dtype == torch.int64, lambda: f"mst::linear_ce takes int64 labels, got {labels.dtype}")
    torch._check(labels.dim() == 1 and h.dim() == 2, lambda: "mst::linear_ce takes [rows] labels for [rows, H]")
    torch._check(labels.shape[0] == h.shape[0], lambda: "mst::linear_ce: one label per row")
    return (
        h.new_empty((), dtype=post.dtype or torch.float32),
        labels.new_empty((), dtype=torch.int64),
        h.new_empty(h.shape) if need_h else h.new_empty(_EMPTY),
        w.new_empty(w.shape) if need_w else w.new_empty(_EMPTY),
        b.new_empty(b.shape) if (need_b and b is not None) else h.new_empty(_EMPTY),
        h.new_empty((h.shape[0], w.shape[0]), dtype=pre.dtype or h.dtype) if head.want_logits else h.new_empty(_EMPTY),
    )


def _setup(ctx, inputs, output):
    *_, spec = inputs
    _, count, dh, dw, db, logits = output
    ctx.mark_non_differentiable(count, dh, dw, db, logits)
    ctx.save_for_backward(dh, dw, db, count)
    ctx.head = parse(spec, HeadSpec)


def _backward(ctx, g, *_unused):
    dh, dw, db, count = ctx.saved_tensors
    need_h, need_w, need_b = ctx.head.needs
    if ctx.head.mean:
        # Eager's nll_loss backward gives ignored rows an exact 0, so a batch whose labels are all
        # ignore_index has a NaN loss but zero gradients; dividing by a zero count would give NaN.
        g = torch.where(count > 0, g / count.clamp(min=1), torch.zeros_like(g))

    def scale(t, need):
        return _scaled(t, g) if need else None

    return scale(dh, need_h), scale(dw, need_w), scale(db, need_b and db.numel() > 0), None, None


def _scaled(t: torch.Tensor, g: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """``t * g`` with the product taken in fp32 (``g`` never rounded to a low-precision ``t``'s dtype first),
    a block of rows at a time so that no fp32 copy of a whole low-precision ``t`` exists."""
    if t.dtype not in (torch.float16, torch.bfloat16):
        return t * g.to(t.dtype)
    gf, out = g.float(), torch.empty_like(t)
    for s in range(0, t.shape[0], rows):
        out[s : s + rows] = t[s : s + rows].float() * gf
    return out


linear_ce.register_autograd(_backward, setup_context=_setup)
