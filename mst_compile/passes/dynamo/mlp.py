"""Pass: chunk MLP blocks over tokens, recomputing each chunk in backward.

Finds every region that starts at linear projections widening the same input ``x`` (gate and up, or fc1),
continues through row-wise elementwise math (any activation, gating products, biases, splits of a fused
``gate_up`` along the feature dimension) and ends at exactly one narrowing linear (down / fc2).

Before::

    gate = linear(x, Wg); up = linear(x, Wu); h = silu(gate) * up; y = linear(h, Wd)

After::

    y = mst.rowwise(x.reshape(-1, H), [Wg, Wu, Wd], "<rowwise spec>").view(*x.shape[:-1], H)   # opaque to Inductor

Only ``x`` and the weights are saved for backward; the ``tokens x intermediate`` tensors exist for one chunk
at a time, in forward and again (recomputed) in backward.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import fx

from ... import _compat
from ...ops import registry
from ...ops.chunking import Chunks
from ...ops.spec import RowwiseSpec
from ...plan import chunk_plan
from ...report import Region
from ..shared import tval
from .build import emit, extract_body, from_rows, to_rows
from .context import CantChunk, PassContext, skip
from .modes import autocast_states, region_autocast, region_grad
from .nodes import (
    check_split_on_last_dim,
    is_elementwise,
    is_getitem_of_split,
    is_split,
    is_weight_like,
    linear_args,
    numel_bytes,
)


def rowwise_nodes(g: fx.Graph, x: fx.Node, params: list, key: str, chunks: Chunks, width: int):
    """``mst::rowwise`` of body ``key`` in ``chunks`` on ``x``'s tokens as ``[tokens, H]`` rows, and its
    ``[tokens, width]`` result given ``x``'s leading dims (NOTE [cacheable graph]): ``(op node, result node)``."""
    spec = RowwiseSpec(key, chunks).dumps()  # NOTE [body spec]
    call = emit(g, "call_function", torch.ops.mst.rowwise.default, (to_rows(g, x, _width(x)), list(params), spec))
    return call, from_rows(g, call, x, width)


def _width(n) -> int | None:
    v = tval(n)
    if v is None or v.dim() == 0:
        return None
    w = v.shape[-1]
    return int(w) if isinstance(w, int) else None


def _is_glu(n: fx.Node) -> bool:
    """``F.glu`` (``nn.GLU``) halving the feature dimension: row-wise like a split of the last dim and a product."""
    if n.op != "call_function" or n.target is not F.glu:
        return False
    dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else -1)
    v = tval(n)
    return isinstance(dim, int) and v is not None and dim in (-1, v.dim() - 1)


def _is_expanding(n, ctx: PassContext) -> bool:
    la = linear_args(n)
    if la is None:
        return False
    win, wout = _width(la[0]), _width(n)
    return win is not None and wout is not None and wout >= ctx.config.min_expansion * win


def find_region(start: fx.Node, ctx: PassContext) -> tuple[fx.Node, list[fx.Node], fx.Node]:
    """``(x, region nodes in graph order, exit node)`` of the MLP that ``start`` (an expanding linear) opens."""
    x = linear_args(start)[0]
    xv = tval(x)
    if xv is None or xv.dim() < 2:
        raise CantChunk(f"input of {start.name} has no token dimension")
    lead = tuple(xv.shape[:-1])
    region: set[fx.Node] = set()
    exits: set[fx.Node] = set()
    queue = [start]
    region.add(start)

    def admit(n: fx.Node, why: fx.Node) -> None:
        if n in region:
            return
        if n in ctx.claimed:
            raise CantChunk(f"{n.name} belongs to another region")
        if linear_args(n) is None and not (is_elementwise(n) or is_split(n) or is_getitem_of_split(n) or _is_glu(n)):
            raise CantChunk(f"{why.name} feeds {n.name} ({n.target}), which is not row-wise")
        region.add(n)
        queue.append(n)

    while queue:
        m = queue.pop()
        if is_split(m):
            check_split_on_last_dim(m)
        la = linear_args(m)
        if la is not None and (la[1] is None or not isinstance(la[1], fx.Node)):
            raise CantChunk(f"{m.name} has no weight node")
        for inp in m.all_input_nodes:
            ila = linear_args(inp)
            if ila is not None and ila[0] is x and inp not in region:
                admit(inp, m)  # a sibling projection of x (the up projection next to the gate)
        v = tval(m)
        if v is not None and tuple(v.shape[:-1]) != lead:
            raise CantChunk(f"{m.name} has shape {tuple(v.shape)}, not [{lead}, features]")
        if la is not None and la[0] is not x and (_width(m) or 0) < (_width(la[0]) or 0):
            exits.add(m)  # narrowing projection: the MLP's output
            continue
        for u in m.users:
            if u.op == "output":
                raise CantChunk(f"{m.name} (an MLP intermediate) is a graph output")
            admit(u, m)
    if len(exits) != 1:
        raise CantChunk(f"expected one narrowing projection closing the MLP, found {len(exits)}")
    for m in region:
        la = linear_args(m)
        for inp in m.all_input_nodes:
            if inp is x or inp in region:
                continue
            if la is not None and inp in (la[1], la[2]):
                if tval(inp) is None or tval(inp).dim() > 2:
                    raise CantChunk(f"weight {inp.name} of {m.name} is not a matrix or vector")
                continue
            if not is_weight_like(inp):
                raise CantChunk(f"{m.name} reads {inp.name}, which is neither the MLP input, a region value nor a weight")
    (exit_node,) = exits
    order = [n for n in start.graph.nodes if n in region]
    return x, order, exit_node


def _rows(x: fx.Node):
    """Tokens (product of the leading dims) when static, else None."""
    v = tval(x)
    n = 1
    for d in v.shape[:-1]:
        if not isinstance(d, int):
            return None
        n *= d
    return n


def _wide(x: fx.Node, region: list[fx.Node]) -> int:
    """The widened widths the region's first projections make (NOTE [auto chunk count], ``plan.py``)."""
    return sum(_width(n) or 0 for n in region if linear_args(n) is not None and linear_args(n)[0] is x)


def rewrite(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Find -> check -> apply for every MLP region in ``gm``; skipped regions stay unchanged."""
    if not ctx.config.mlp:
        return
    # NOTE [shared input]: when a candidate is rejected, the other widening projections of its input are most
    # often part of the same candidate (gate and up): they are tried again without a second record. They can also
    # open an MLP of their own beside it (a parallel block whose fused qkv and fc1 read one norm: Phi-2, GPT-J):
    # that one is rewritten as usual.
    siblings_of_rejected: set[fx.Node] = set()
    for start in list(gm.graph.nodes):
        if start in ctx.claimed or not _is_expanding(start, ctx):
            continue
        rec = Region("mlp", start.name, "skipped")
        try:
            x, region, exit_node = find_region(start, ctx)
            params = _params(x, region)
            _, w_exit, b_exit = linear_args(exit_node)
            body = extract_body(gm.graph, [n for n in region if n is not exit_node], [x] + params, linear_args(exit_node)[0])
            ev = tval(exit_node)
            amp = region_autocast(region, autocast_states(gm.graph))
            region_grad(region, ctx, gm.graph)  # the op runs in the region's mode (NOTE [grad mode per node])
            key = registry.register(
                "mlp", body, int(ev.shape[-1]), ev.dtype, params.index(w_exit), params.index(b_exit) if b_exit else -1,
                autocast=amp, compiled=ctx.config.compiles_bodies(tval(x).device.type),
            )  # fmt: skip
            row_bytes = sum((_width(n) or 0) * ev.element_size() for n in region if n is not exit_node)
            xv = tval(x)
            plan = chunk_plan(ctx.config, rows=_rows(x), input_size=_width(x) or 1, wide_size=_wide(x, region),
                              row_bytes=row_bytes, device_type=xv.device.type, device_index=xv.device.index)  # fmt: skip
            if plan.whole:
                raise CantChunk("the whole intermediate fits one chunk: left to Inductor (NOTE [one chunk is whole])")
            chunks, label = plan.chunks, plan.label
            if _width(x) is None:
                raise CantChunk("the input's feature dimension is not static")
            _check_body(ctx, key, x, params, ev)
        except Exception as e:  # noqa: BLE001 - CantChunk, or a bug: either way this region stays as it was
            ctx.claimed.add(start)
            if start in siblings_of_rejected:
                continue  # part of a candidate already recorded as skipped (NOTE [shared input])
            skip(rec, e)
            ctx.regions.append(rec)
            siblings_of_rejected.update(u for u in linear_args(start)[0].users if _is_expanding(u, ctx))
            continue
        with gm.graph.inserting_before(exit_node):
            _, new = rowwise_nodes(gm.graph, x, params, key, chunks, int(ev.shape[-1]))
        new.meta.update(exit_node.meta)
        exit_node.replace_all_uses_with(new)
        for n in reversed(region):
            gm.graph.erase_node(n)
        rec.status, rec.chunks = "rewritten", label
        rec.nodes = [n.name for n in region]
        xv = tval(x)
        rec.shapes = f"x={list(xv.shape)} widths={[_width(n) for n in region if linear_args(n)]}"
        inter = sum(numel_bytes(tval(n)) for n in region if n is not exit_node)
        rec.bytes_saved = int(inter * (1 - 1 / int(label))) if label.isdigit() else 0
        ctx.regions.append(rec)
        ctx.claimed.update(region)


def _params(x: fx.Node, region: list[fx.Node]) -> list[fx.Node]:
    seen: list[fx.Node] = []
    rs = set(region)
    for n in region:
        for inp in n.all_input_nodes:
            if inp is not x and inp not in rs and inp not in seen:
                seen.append(inp)
    return seen


def _check_body(ctx: PassContext, key: str, x: fx.Node, params: list[fx.Node], expect) -> None:
    """Run the extracted body once on a 2-row fake chunk: it must give ``[rows, out]`` of the region's dtype.

    A fresh FakeTensorMode, not the graph's fake values: a check must not install shape guards (dynamic
    shapes); fake tensors keep their device, so autocast applies as it will at run time."""
    xv = tval(x)
    pv = [tval(p) for p in params]
    if xv is None or any(p is None for p in pv):
        raise CantChunk("missing fake values for the region's inputs")
    try:
        with _compat.FakeTensorMode():
            xm = torch.empty((2, xv.shape[-1]), dtype=xv.dtype, device=xv.device)
            pm = [torch.empty(tuple(p.shape), dtype=p.dtype, device=p.device) for p in pv]
            out = dataclasses.replace(registry.get(key), compiled=False)(xm, *pm)  # op by op: no compile here
    except Exception as e:  # noqa: BLE001 - any failure means: leave the region alone
        raise CantChunk(f"the extracted body does not run on a chunk: {type(e).__name__}: {e}") from e
    if out.dim() != 2 or out.shape[-1] != expect.shape[-1] or out.dtype != expect.dtype:
        raise CantChunk(f"the extracted body gives {tuple(out.shape)} {out.dtype}, expected [rows, {expect.shape[-1]}]")
