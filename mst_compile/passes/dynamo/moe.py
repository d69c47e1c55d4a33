"""Pass: chunk mixture-of-experts blocks over tokens, recomputing each chunk in backward.

A MoE block routes and combines every token on its own: router projection, softmax, top-k, dispatch to the
experts, the experts' MLPs, the weighted combine. Its expert intermediates are as large as a dense MLP's
(``[tokens * top_k, intermediate]``; HF's ``batched_mm`` form also gathers one weight matrix per token and
slot). The pass finds the router (a projection of the block's ``[tokens, hidden]`` input feeding a ``topk``),
admits every node downstream of that input that is proven token-wise (NOTE [token-wise MoE],
``moe_match.py``, ``moe_layout.py``), and runs the whole block as one ``mst::rowwise`` op (the MLP pass's op: its chunk loop,
recompute and weight-gradient accumulation), the router logits (read by the load-balancing loss) returned as
a second row-wise output next to the block's output::

    y = view(x); logits = linear(y, Wr); ... experts ...; out = sum(view(weighted, T, k, H), 1)
  ->
    both = mst.rowwise(y, [Wr, W_gate_up, W_down], "<rowwise spec>")   # [T, H + E]
    out = both[:, :H]; logits = both[:, H:]

Every size that names the token count inside the block (``view(T, k, H)``, ``arange(T * k)``) is re-addressed
to the chunk's rows. Only the block's input and the weights are saved for backward.

Forms: transformers 5's ``experts_implementation="batched_mm"`` and ``"grouped_mm"`` (the default; on the CPU
and for non-bf16 weights under compile it calls ``transformers::grouped_mm_fallback``) are one graph each and
are chunked; so is an expert loop over the experts that dispatches with ``torch.where(mask)`` (litgpt's
``LLaMAMoE``; NOTE [selected rows]) when Dynamo captures ``torch.where`` (``capture_dynamic_output_shape_ops``).
transformers' ``"eager"`` loops over ``nonzero()`` of the expert mask: Dynamo breaks the graph there (a
data-dependent loop count, even with that flag), so no graph holds a whole block; the router's piece is
recorded as skipped.

The MoE pass runs when the MLP pass does (``mlp=True``), before it, so an expert MLP or a shared expert that
reads the block input is part of the MoE region and not taken for a dense MLP.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import fx

from ... import _compat
from ...ops import registry
from ...plan import chunk_plan
from ...report import Region
from ..shared import tval
from .build import emit
from .context import CantChunk, PassContext, skip
from .mlp import rowwise_nodes
from .modes import autocast_states, region_autocast, region_grad
from .moe_admit import Layouts
from .moe_layout import is_fn, is_method
from .moe_match import find_region, has_experts, is_topk, router_of
from .moe_select import is_selection, selection_of

MAX_OUTPUTS = 4


class _Rows:
    """Marker in a copied node's arguments: the chunk's row count times ``f``."""

    def __init__(self, f: int):
        self.f = f


def _readdressed_args(n: fx.Node, lays: Layouts):
    """``(args, kwargs)`` for the body's copy of ``n``: sizes naming the token count made chunk-relative."""
    if is_method(n, "view", "reshape") or is_fn(n, torch.reshape):
        rest = tuple(int(d) for d in tval(n).shape[1:])
        if n.op == "call_method":
            return (n.args[0], -1, *rest), {}
        return (n.args[0], (-1, *rest)), {}
    if is_fn(n, torch.arange):
        return (_Rows(lays.lay[n].f),), dict(n.kwargs)
    return n.args, n.kwargs


def extract(region: list[fx.Node], outputs: list[fx.Node], x: fx.Node, lays: Layouts):
    """``(body, params, widths)``: the block as ``body(x_chunk, *params) -> [rows, sum(widths)]``."""
    copies, params = [], []
    inside = set(region)
    for n in region:
        args, kwargs = _readdressed_args(n, lays)
        refs = []
        fx.node.map_arg((args, kwargs), refs.append)
        for a in refs:
            if a is x or a in inside or a in params:
                continue
            if tval(a) is None:
                raise CantChunk(f"{n.name} reads {a.name}, a size computed outside the block")
            params.append(a)
        copies.append((n, args, kwargs))
    g = fx.Graph()
    env = {x: g.placeholder("in0")}
    for i, p in enumerate(params, 1):
        env[p] = g.placeholder(f"in{i}")
    rows = None

    def lookup(a):
        nonlocal rows
        if isinstance(a, _Rows):
            if rows is None:
                rows = g.call_method("size", (env[x], 0))
            return g.call_function(operator.mul, (rows, a.f))
        return a

    for n, args, kwargs in copies:
        args, kwargs = fx.node.map_arg((args, kwargs), lambda a: env[a])
        args, kwargs = fx.node.map_aggregate(args, lookup), fx.node.map_aggregate(kwargs, lookup)
        new = g.create_node(n.op, n.target, args, kwargs, name=n.name)
        env[n] = new
    outs, widths = [], []
    for o in outputs:
        w = math.prod(int(d) for d in tval(o).shape[1:])
        oo = env[o] if tval(o).dim() == 2 else g.call_method("reshape", (env[o], -1, w))
        outs.append(oo)
        widths.append(w)
    g.output(outs[0] if len(outs) == 1 else g.call_function(torch.cat, (outs,), {"dim": -1}))
    return fx.GraphModule(torch.nn.Module(), g), params, widths


def output_slice(g: fx.Graph, y: fx.Node, start: int, stop: int, shape: list[int]) -> fx.Node:
    """What the rewritten graph reads for one region output: its columns of the op's result, ``[T, *shape]``."""
    part = emit(g, "call_function", operator.getitem, (y, (slice(None), slice(start, stop))))
    return part if len(shape) == 1 else emit(g, "call_method", "reshape", (part, -1, *shape))


def _check_body(key: str, x: fx.Node, params: list[fx.Node], width: int, dtype, selects: bool) -> None:
    """Run the body on a 3-row fake chunk (a fresh FakeTensorMode: no shape guards reach the user's graph; with
    a shape environment of its own where the body selects rows, whose count is data-dependent)."""
    xv = tval(x)
    try:
        with _compat.FakeTensorMode(shape_env=_compat.ShapeEnv() if selects else None):
            xm = torch.empty((3, xv.shape[-1]), dtype=xv.dtype, device=xv.device)
            pm = [torch.empty(tuple(tval(p).shape), dtype=tval(p).dtype, device=tval(p).device) for p in params]
            out = registry.get(key)(xm, *pm)
    except Exception as e:  # noqa: BLE001 - any failure means: leave the block alone
        raise CantChunk(f"the extracted block does not run on a chunk: {type(e).__name__}: {e}") from e
    if tuple(out.shape) != (3, width) or out.dtype != dtype:
        raise CantChunk(f"the extracted block gives {tuple(out.shape)} {out.dtype}, expected [rows, {width}] {dtype}")


def _expected_numel(n: fx.Node, lays: Layouts, selections: int) -> float:
    """A value's element count for the plan; the rows of a selection (a data-dependent count) taken as the
    mask's true entries over ``selections``: their mean over the region's selections is ``mask.numel() / n``
    when each token picks ``k`` of ``n`` experts (NOTE [selected rows]); ``selections=1`` gives all the experts'
    rows together, the size of the grouped form's single tensor."""
    v, where = tval(n), selection_of(lays.lay.get(n))
    if where is not None and v.dim():
        rows = _compat.size_hint(tval(where.args[0]).numel()) / max(selections, 1)
        return rows * math.prod(_compat.size_hint(d) for d in v.shape[1:])
    return _compat.size_hint(v.numel())


def _plan(ctx: PassContext, x: fx.Node, region: list[fx.Node], outputs: list[fx.Node], lays: Layouts, selections: int):
    xv = tval(x)
    t = xv.shape[0]
    tensors = [n for n in region if tval(n) is not None]
    tokens = max(_compat.size_hint(t), 1)
    per_token = [_expected_numel(n, lays, selections) * tval(n).element_size() / tokens
                 for n in tensors if n not in outputs]  # fmt: skip
    wide = max([int(_expected_numel(n, lays, 1)) // tokens for n in tensors] + [1])
    rows = t if isinstance(t, int) else None
    plan = chunk_plan(ctx.config, rows=rows, input_size=int(xv.shape[-1]), wide_size=wide, row_bytes=int(sum(per_token)),
                      device_type=xv.device.type, device_index=xv.device.index)  # fmt: skip
    if plan.whole:
        raise CantChunk("the whole block fits one chunk: left to Inductor (NOTE [one chunk is whole])")
    return plan, sum(per_token) * _compat.size_hint(t)


def rewrite(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Find -> check -> apply for every MoE block in ``gm``; skipped blocks stay unchanged."""
    if not ctx.config.mlp:
        return
    routers: dict[fx.Node, tuple] = {}
    for n in gm.graph.nodes:
        found = router_of(n) if is_topk(n) and n not in ctx.claimed else None
        if found is not None:  # else a top-k of something else (a loss re-ranking graph inputs, say)
            routers.setdefault(found[1], (found[0], []))[1].append(n)
    for router, (x, topks) in routers.items():
        if router in ctx.claimed:
            continue
        rec = Region("moe", router.name, "skipped")
        try:
            region, outputs, lays = find_region(x, ctx)
            inside = set(region)
            if not any(t in inside for t in topks):
                raise CantChunk("the router's top-k is not token-wise here")
            if not has_experts(region, lays):
                first = next((u for t in topks for u in t.users), None)
                raise CantChunk("no experts found after the router in this graph (a graph break after the top-k, "
                                "or an expert loop not proven token-wise)" + (f"; the top-k feeds {first.name}" if first else ""))  # fmt: skip
            if len(outputs) > MAX_OUTPUTS:
                raise CantChunk(f"the block has {len(outputs)} outputs read outside it")
            dtypes = {tval(o).dtype for o in outputs}
            if len(dtypes) != 1:
                raise CantChunk(f"the block's outputs have different dtypes ({sorted(map(str, dtypes))})")
            (dtype,) = dtypes
            body, params, widths = extract(region, outputs, x, lays)
            amp = region_autocast(region, autocast_states(gm.graph))
            region_grad(region, ctx, gm.graph)
            # NOTE [compiled bodies] does not apply: a MoE body's sort, histogram and gathers are not measured
            # through compile_fx, so it runs op by op on every device
            key = registry.register("moe", body, sum(widths), dtype, autocast=amp, compiled=False)
            selections = sum(1 for n in region if is_selection(n))
            plan, inter = _plan(ctx, x, region, outputs, lays, selections)
            _check_body(key, x, params, sum(widths), dtype, selections > 0)
            order = {n: i for i, n in enumerate(gm.graph.nodes)}
            last_input = max([x, *params], key=order.__getitem__)
            users = [u for o in outputs for u in o.users if u not in set(region)]
            if any(order[u] <= order[last_input] for u in users):
                raise CantChunk("an output of the block is read before all of its weights are defined")
        except Exception as e:  # noqa: BLE001 - CantChunk, or a bug: either way this block stays as it was
            skip(rec, e)
            ctx.regions.append(rec)
            ctx.claimed.update([router, *topks])
            continue
        _apply(gm, x, params, key, plan, region, outputs, widths, last_input)
        rec.status, rec.chunks = "rewritten", plan.label
        rec.nodes = [n.name for n in region]
        rec.shapes = f"x={list(tval(x).shape)} outputs={[o.name for o in outputs]}"
        rec.bytes_saved = int(inter * (1 - 1 / int(plan.label))) if plan.label.isdigit() else 0
        ctx.regions.append(rec)
        ctx.claimed.update(region)


def _apply(gm, x, params, key, plan, region, outputs, widths, last_input) -> None:
    g = gm.graph
    with g.inserting_before(last_input.next):  # in order: each new node goes right before that one
        _, call = rowwise_nodes(g, x, params, key, plan.chunks, sum(widths))
        start = 0
        for o, w in zip(outputs, widths):
            part = output_slice(g, call, start, start + w, [int(d) for d in tval(o).shape[1:]])
            part.meta.update(o.meta)
            o.replace_all_uses_with(part)
            start += w
    for n in reversed(region):
        g.erase_node(n)
