"""The entry projections of a row-wise body: the GEMMs that read the chunk's input, issued by the op itself.

NOTE [entry projections]: a body whose input ``x`` is read only by projections ``linear(x, W_k[, b_k])`` of its
own parameters (each ``W_k``, ``b_k`` read by nothing else) is split into those projections and a *middle*
``middle(e_0, .., e_{K-1}, *params)`` (``e_k`` the projections' outputs, the parameters passed as before). The
backward's recompute then runs the projections without autograd and only the middle under it, so that each
chunk's projection gradients are GEMMs of the op's own, written where they belong:
``W_k``'s into its accumulator (``addmm_``: no weight-sized temporary, no add; NOTE [weight-gradient
accumulation]), ``x``'s straight into the input gradient's rows (``mm(out=)`` then ``addmm_``: no copy, no add of
the K partial gradients). It applies when the projections and their inputs share one dtype, or when the region
ran under autocast: the GEMMs then run in the autocast dtype, on ``x``'s chunk cast once for all K projections
and on ``W_k``, ``b_k`` cast once per op call (NOTE [one cast per call]), as autocast runs ``linear``; each
``W_k``'s gradient goes into its fp32 accumulator by the fp32-output GEMM where the device has one, and ``x``'s
gradient is the sum of the K low-precision partials in ``x``'s dtype, as autograd sums them. The values are the
ones autograd computes (the same GEMMs), up to the order in which the K partials of ``x``'s gradient are summed
(and, with the fp32-output GEMM, the weight gradient's rounding, which only the fp32 accumulator sees).
Before and after, for a SwiGLU body::

    fn(x, wg, wu, wd):  silu(linear(x, wg)) * linear(x, wu)
    middle(e0, e1, wg, wu, wd):  silu(e0) * e1        entries: (weight 0, no bias), (weight 1, no bias)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .. import _compat


@dataclass(frozen=True)
class Entries:
    """A body split at its entry projections: ``weights[k]``, ``biases[k]`` index the body's parameters (``-1``:
    no bias)."""

    middle: fx.GraphModule
    weights: tuple[int, ...]
    biases: tuple[int, ...]

    def owned(self) -> set[int]:
        """The parameters only the projections read: their gradients are the op's GEMMs, not autograd's."""
        return set(self.weights) | {b for b in self.biases if b >= 0}


def _linear_args(n: fx.Node):
    args = list(n.args) + [None] * (3 - len(n.args))
    return args[0], args[1], n.kwargs.get("bias", args[2])


def split(gm: fx.GraphModule) -> Entries | None:
    """The split of NOTE [entry projections], or ``None`` where the body does not have that shape."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(phs) < 2:
        return None
    x, params = phs[0], phs[1:]
    index = {p: i for i, p in enumerate(params)}
    entries = list(x.users)
    if not entries or any(u.op != "call_function" or u.target not in _compat.LINEAR_FUNCTIONS
                          or u.kwargs.keys() - {"bias"} for u in entries):  # fmt: skip
        return None
    weights, biases = [], []
    for u in entries:
        a, w, b = _linear_args(u)
        if a is not x or w not in index or (b is not None and b not in index):
            return None
        if len(w.users) != 1 or (b is not None and len(b.users) != 1):
            return None
        weights.append(index[w])
        biases.append(index[b] if b is not None else -1)
    if len(set(weights) | {b for b in biases if b >= 0}) != len(weights) + sum(b >= 0 for b in biases):
        return None  # one parameter as both weight and bias of a projection (a node counts a user once)
    g = fx.Graph()
    env = {u: g.placeholder(f"e{k}") for k, u in enumerate(entries)}
    env.update({p: g.placeholder(p.name) for p in params})
    for n in gm.graph.nodes:
        if n.op != "placeholder" and n not in env:
            env[n] = g.node_copy(n, env.__getitem__)
    return Entries(fx.GraphModule(torch.nn.Module(), g), tuple(weights), tuple(biases))


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, out: torch.Tensor | None = None):
    """``F.linear(x, w, b)`` as the GEMM it calls (``mm``, or ``addmm`` with a bias), written into ``out`` when
    given: the same values, no temporary and copy (``out`` contiguous, every dtype equal, no autocast)."""
    kw = {} if out is None else {"out": out}
    return torch.mm(x, w.t(), **kw) if b is None else torch.addmm(b, x, w.t(), **kw)


_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)  # what autocast's linear casts to its dtype


def compute_dtype(entries: Entries | None, x: torch.Tensor, params, autocast) -> torch.dtype | None:
    """The dtype the op's projection GEMMs run in for these inputs, ``None`` where the op may not issue them
    (NOTE [entry projections]): the one dtype of ``x`` and the projections' parameters, or under the region's
    autocast ``(device, dtype)`` that dtype, when autocast would cast every one of them to it."""
    if entries is None:
        return None
    ps = [params[i] for i in entries.weights] + [params[b] for b in entries.biases if b >= 0]
    if autocast:
        same_device = all(t.device.type == autocast[0] for t in (x, *ps))
        return autocast[1] if same_device and all(t.dtype in _AUTOCAST_CASTS for t in (x, *ps)) else None
    return x.dtype if all(p.dtype == x.dtype for p in ps) else None


def cast_params(entries: Entries, params, dtype: torch.dtype) -> list:
    """``params`` detached, the projections' own cast to ``dtype`` once for the op call (NOTE [one cast per
    call]); the others as they are."""
    owned = entries.owned()
    return [p.detach().to(dtype) if i in owned else p.detach() for i, p in enumerate(params)]


def project(entries: Entries, x: torch.Tensor, params) -> list[torch.Tensor]:
    """The projections' outputs ``e_k = linear(x, W_k, b_k)`` (no autograd: the op computes their gradients);
    ``x`` and the projections' parameters in one dtype (:func:`cast_params`)."""
    return [linear(x, params[w], params[b] if b >= 0 else None) for w, b in zip(entries.weights, entries.biases)]


def input_grad(entries: Entries, grads, params, rows: torch.Tensor) -> None:
    """``rows = sum_k grads[k] @ W_k`` written in place: the first GEMM writes, the next ones add (``addmm_``);
    ``rows`` in another dtype than the GEMMs (autocast): each partial in the GEMMs' dtype, summed in ``rows``'s,
    as autograd sums them."""
    for k, (g, w) in enumerate(zip(grads, entries.weights)):
        wk = params[w]
        if g is None:
            if k == 0:
                rows.zero_()
            continue
        if rows.dtype != g.dtype:
            rows.copy_(g @ wk) if k == 0 else rows.add_(g @ wk)
        else:
            torch.mm(g, wk, out=rows) if k == 0 else rows.addmm_(g, wk)
