"""Finding a MoE block: the router (a projection of the block's ``[tokens, hidden]`` input feeding a ``topk``)
and the token-wise region after that input (NOTE [token-wise MoE]), without touching the graph."""

from __future__ import annotations

import operator

import torch
from torch import fx

from ..shared import tval, val
from .context import CantChunk, PassContext
from .moe_admit import Layouts
from .moe_layout import GROUPED_MM_FUNCTIONS, GROUPED_MM_OPS, Lay, NotRowwise, is_fn, is_method, op_name
from .moe_select import is_constant_factory, selection_of
from .nodes import linear_args


def is_topk(n: fx.Node) -> bool:
    return is_fn(n, torch.topk) or is_method(n, "topk")


def router_of(topk: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(x, router projection)`` of a top-k that ranks a projection of ``x``, else ``None``: walk back through
    casts and the softmax to the projection, then up its input's ``view``/``reshape`` chain to the topmost
    ``[tokens, hidden]`` value (the one the experts read too)."""
    n = topk.args[0]
    for _ in range(6):
        if not isinstance(n, fx.Node):
            return None
        if linear_args(n) is not None:
            break
        single = is_method(n, "float", "to", "softmax", "type_as") or is_fn(
            n, torch.softmax, torch.nn.functional.softmax, torch.sigmoid
        )
        if not single:
            return None
        n = n.args[0]
    else:
        return None
    router = n
    x, w, _ = linear_args(router)
    if not isinstance(x, fx.Node) or not isinstance(w, fx.Node) or tval(w) is None or tval(w).dim() != 2:
        return None
    while (is_method(x, "view", "reshape") or is_fn(x, torch.reshape)) and tval(x.args[0]) is not None and (
        tval(x.args[0]).dim() == 2
    ):
        x = x.args[0]
    return x, router


def _weight_like(n: fx.Node, memo: dict, tokens) -> bool:
    """A value made only from parameters, module attributes and constants: a weight, never token-shaped."""
    if n in memo:
        return memo[n]
    memo[n] = False
    if is_constant_factory(n, tokens):
        ok = True
    elif n.op == "placeholder":
        ok = isinstance(val(n), torch.nn.Parameter)
    elif n.op == "get_attr":
        ok = True
    else:
        ins = n.all_input_nodes
        ok = bool(ins) and all(_weight_like(a, memo, tokens) for a in ins) and tval(n) is not None
    memo[n] = ok
    return ok


def find_region(x: fx.Node, ctx: PassContext):
    """``(region nodes in graph order, outputs, layouts)`` of the token-wise block that starts at ``x``."""
    xv = tval(x)
    if xv is None or xv.dim() != 2:
        raise CantChunk(f"the router reads {x.name}, which is not a [tokens, hidden] matrix")
    memo: dict = {}
    lays = Layouts(x, lambda a: _weight_like(a, memo, xv.shape[0]))
    order = {n: i for i, n in enumerate(x.graph.nodes)}
    cone, region, rejected = {x}, [], {}
    for n in x.graph.nodes:
        if order[n] <= order[x] or not any(a in cone for a in n.all_input_nodes):
            continue
        cone.add(n)
        if n.op != "call_function" and n.op != "call_method" or n in ctx.claimed:
            rejected[n] = f"{n.name} is not an op of this region"
            continue
        try:
            lays.lay[n] = lays.admit(n)
            region.append(n)
        except NotRowwise as e:
            rejected[n] = str(e)
    region = sorted(set(region) | set(lays.extra), key=order.__getitem__)
    inside = set(region)
    outputs = [n for n in region if any(u not in inside for u in n.users)]
    for n in region:
        writes = lays.writers.get(n)
        if writes and any(u not in inside and order[u] < max(map(order.__getitem__, writes)) for u in n.users):
            raise CantChunk(f"{n.name} is written in place and read outside the block before the write")
    for o in outputs:
        why = next((rejected[u] for u in o.users if u in rejected), "")
        lay, v = lays.lay.get(o), tval(o)
        if not (isinstance(lay, Lay) and lay.kind == "rows" and lay.f == 1 and lay.sort is None and v is not None):
            raise CantChunk(f"{o.name} (inside the block, not one row per token) is read outside it" + (f": {why}" if why else ""))
        if not v.is_floating_point():
            raise CantChunk(f"{o.name} ({v.dtype}) is read outside the block" + (f": {why}" if why else ""))
        if not all(isinstance(d, int) for d in v.shape[1:]):
            raise CantChunk(f"{o.name} has a symbolic feature size")
    return region, outputs, lays


def has_experts(region: list[fx.Node], lays: Layouts) -> bool:
    """A grouped matmul, or a batched matmul / projection over weights gathered per row (``W[expert_ids]``)."""
    gathered = {n for n in region if n.op == "call_function" and n.target is operator.getitem
                and lays.of(n.args[0]) is None and isinstance(n.args[1], fx.Node)}  # fmt: skip
    for n in region:
        if linear_args(n) is not None and selection_of(lays.of(linear_args(n)[0])) is not None:
            return True  # a projection of one selection's rows: an expert of a ``torch.where`` loop
        if op_name(n.target) in GROUPED_MM_OPS or is_fn(n, *GROUPED_MM_FUNCTIONS):
            return True
        if (is_fn(n, torch.bmm, torch.matmul) or is_method(n, "bmm", "matmul")) and any(
            a in gathered for a in n.all_input_nodes
        ):
            return True
    return False
