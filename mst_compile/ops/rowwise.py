"""``mst::rowwise``: apply a row-wise body to a ``[tokens, features]`` tensor one mini-sequence at a time.

Forward keeps only one chunk's intermediates alive; backward recomputes each chunk's forward under autograd,
writes that chunk's input gradient into its rows and accumulates parameter gradients in place into one buffer
per parameter (fp32 for low-precision parameters).

NOTE [opaque chunk loops]: the loop lives inside a custom op so that Inductor cannot fuse or reorder across
chunks, and the partitioner sees only the op's inputs (``x`` and the weights) as saved values. Why: under
compile, ``checkpoint`` per chunk lets Inductor fuse the sum of the per-chunk weight-gradient partials into one
kernel at the end, which keeps them all alive at once; an op that accumulates in place holds one chunk's.
"""

from __future__ import annotations

import torch

from .. import _compat
from . import entry, registry
from .accumulate import GradAccumulator
from .spec import RowwiseSpec, parse


@torch.library.custom_op("mst::rowwise", mutates_args=())
def rowwise(x: torch.Tensor, params: list[torch.Tensor], spec: str) -> torch.Tensor:
    """``spec``: a :class:`~.spec.RowwiseSpec` string (NOTE [body spec])."""
    rs = parse(spec, RowwiseSpec)
    body = registry.get(rs.body)
    out = x.new_empty((x.shape[0], body.out_features), dtype=body.out_dtype or x.dtype)
    # NOTE [entry projections]: the op's own GEMMs on the chunk, cast once for all of them, and the middle
    proj_dtype = entry.compute_dtype(body.entries, x, params, body.autocast)
    ent_params = None if proj_dtype is None else entry.cast_params(body.entries, params, proj_dtype)
    # the body sets its region's autocast (NOTE [autocast]), its weights cast once for all chunks (NOTE [one cast
    # per call])
    with torch.no_grad(), registry.no_autocast(x.device.type):
        for s, e in rs.chunks.bounds(x.shape[0]):
            if ent_params is None:
                body.write(out[s:e], x[s:e], *params)
            else:
                es = entry.project(body.entries, x[s:e].to(proj_dtype), ent_params)
                body.write(out[s:e], None, *params, es=es)
    return out


@rowwise.register_fake
def _(x, params, spec):
    body = parse(parse(spec, RowwiseSpec).body)  # not the registry: no body may be built here (NOTE [body spec])
    return x.new_empty((x.shape[0], body.out_features), dtype=body.dtype or x.dtype)


@torch.library.custom_op("mst::rowwise_backward", mutates_args=())
def rowwise_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    params: list[torch.Tensor],
    spec: str,
    needs: list[bool],
) -> list[torch.Tensor]:
    """``spec``: the forward's :class:`~.spec.RowwiseSpec` string; ``needs``: which of ``x, *params`` get a gradient."""
    rs = parse(spec, RowwiseSpec)
    body = registry.get(rs.body)
    gx = x.new_empty(x.shape) if needs[0] else None
    leaves = [p.detach().requires_grad_(n) for p, n in zip(params, needs[1:])]
    bounds = rs.chunks.bounds(x.shape[0])
    # NOTE [weight-gradient accumulation]
    accs = [GradAccumulator(p, len(bounds)) if n else None for p, n in zip(params, needs[1:])]
    # NOTE [entry projections]: the op's own GEMMs for the projections of x, autograd for the middle
    proj_dtype = entry.compute_dtype(body.entries, x, params, body.autocast)
    ent = body.entries if proj_dtype is not None else None
    owned = ent.owned() if ent else set()
    ent_params = entry.cast_params(ent, params, proj_dtype) if ent else None
    wanted = [p for i, (p, n) in enumerate(zip(leaves, needs[1:])) if n and i not in owned]
    ent_grads = bool(ent) and (needs[0] or any(needs[1 + i] for i in owned))
    exit_wc = None  # the exit weight in the body's compute dtype, cast once (NOTE [one cast per call])
    with _compat.autograd_inside_op(), registry.no_autocast(x.device.type):  # the exit GEMMs: the body's dtype
        for s, e in bounds:
            xr = x[s:e].detach()
            if ent:
                xr = xr.to(proj_dtype)  # one cast of the chunk for all its projections (a no-op outside autocast)
                with torch.no_grad():
                    es = entry.project(ent, xr, ent_params)
                es = [t.requires_grad_(ent_grads) for t in es]
                out, inputs = body.middle(es, *leaves), (es if ent_grads else []) + wanted
            else:
                xc = xr.requires_grad_(needs[0])
                out, inputs = body.inner(xc, *leaves), ([xc] if needs[0] else []) + wanted
            g_out = grad[s:e]
            if body.exit_w >= 0:  # NOTE [exit projection]; the GEMMs run in the body's compute dtype
                mid = out.detach()
                cd = mid.dtype
                if needs[1 + body.exit_w]:
                    accs[body.exit_w].add_mm(g_out.t().to(cd), mid)
                if body.exit_b >= 0 and needs[1 + body.exit_b]:
                    accs[body.exit_b].add(g_out.sum(0, dtype=accs[body.exit_b].acc_dtype))
                if exit_wc is None:
                    exit_wc = params[body.exit_w].detach().to(cd)
                g_out = g_out.to(cd) @ exit_wc
            if not inputs or not out.requires_grad:
                if needs[0]:
                    gx[s:e] = 0
                out = mid = g_out = None
                continue
            grads = list(torch.autograd.grad(out, inputs, g_out, allow_unused=True))
            if ent_grads:
                ges, grads = grads[: len(es)], grads[len(es) :]
                for g, w, b in zip(ges, ent.weights, ent.biases):
                    if g is not None and needs[1 + w]:
                        accs[w].add_mm(g.t(), xr)
                    if g is not None and b >= 0 and needs[1 + b]:
                        accs[b].add(g.sum(0, dtype=accs[b].acc_dtype))
                if needs[0]:
                    entry.input_grad(ent, ges, ent_params, gx[s:e])
                es = ges = None
            elif needs[0]:
                g = grads.pop(0)
                gx[s:e] = 0 if g is None else g
            it = iter(grads)
            for i, (acc, n) in enumerate(zip(accs, needs[1:])):
                if n and i not in owned:
                    acc.add(next(it))
            # this chunk's output, its gradient and the weight-sized partials must not be alive while the next
            # chunk's forward is recomputed
            out = mid = g_out = grads = g = None
    result = [gx if gx is not None else x.new_empty(0)]
    for acc, p in zip(accs, params):
        result.append(p.new_empty(0) if acc is None else acc.result())
    return result


@rowwise_backward.register_fake
def _(grad, x, params, spec, needs):
    # contiguous, as the kernel returns them (a transposed weight such as GPT-2's Conv1D ``W.t()`` included)
    result = [x.new_empty(x.shape) if needs[0] else x.new_empty(0)]
    result += [p.new_empty(p.shape) if n else p.new_empty(0) for p, n in zip(params, needs[1:])]
    return result


def _setup(ctx, inputs, output):
    x, params, spec = inputs
    ctx.save_for_backward(x, *params)
    ctx.spec = spec
    ctx.needs = [x.requires_grad] + [p.requires_grad for p in params]


def _backward(ctx, grad):
    x, *params = ctx.saved_tensors
    if not any(ctx.needs):
        return None, [None] * len(params), None
    res = torch.ops.mst.rowwise_backward(grad, x, params, ctx.spec, ctx.needs)
    gx = res[0] if ctx.needs[0] else None
    gps = [g if n else None for g, n in zip(res[1:], ctx.needs[1:])]
    return gx, gps, None


rowwise.register_autograd(_backward, setup_context=_setup)
