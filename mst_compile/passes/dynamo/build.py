"""How the Dynamo-graph passes build what they insert: nodes with their fake values, the ``[tokens, features]``
rows the chunked ops take, and the chunk bodies cut out of the graph."""

from __future__ import annotations

import torch
from torch import fx

from ... import _compat
from ..shared import tval, val
from .nodes import is_split


# NOTE [cacheable graph]: a rewritten graph calls only ``torch.ops.mst.*`` / aten OpOverloads, builtins
# (``operator.getitem``, ``torch.arange``) and tensor methods (``reshape``, ``view``, ``to``) on nodes that carry
# a fake value, never a Python function of this package: AOTAutograd's cache (``check_node_safe``) bypasses a
# graph with any other call, and a cache entry must not depend on code that only this process has. Every node a
# pass inserts goes through :func:`emit`, which records that fake value.
def emit(g: fx.Graph, op: str, target, args: tuple, kwargs: dict | None = None, like: fx.Node | None = None) -> fx.Node:
    """Insert ``op``/``target`` (``call_function`` or ``call_method``) and record its fake value, computed on
    the inputs' fake values in their FakeTensorMode, or ``like``'s for a node with no tensor input
    (NOTE [cacheable graph])."""
    kwargs = kwargs or {}
    n = g.create_node(op, target, tuple(args), kwargs)
    refs: list[fx.Node] = []
    fx.node.map_arg((tuple(args), kwargs), refs.append)
    fargs, fkwargs = fx.node.map_arg((tuple(args), kwargs), val)
    leaves: list = []
    fx.node.map_aggregate([val(r) for r in refs + ([like] if like is not None else [])], lambda v: leaves.append(v))
    mode = _compat.fake_mode_of(leaves)
    if mode is None or any(val(r) is None for r in refs):
        return n  # no fake values to compute from (a graph built by hand): the node is still correct
    with mode:
        fn = getattr(fargs[0], target) if op == "call_method" else target
        n.meta["example_value"] = fn(*(fargs[1:] if op == "call_method" else fargs), **fkwargs)
    return n


def size_args(g: fx.Graph, x: fx.Node, dims) -> list:
    """``x``'s sizes at ``dims`` as graph arguments: ints where static, ``aten.sym_size.int`` nodes otherwise."""
    v = tval(x)
    return [v.shape[d] if isinstance(v.shape[d], int) else emit(g, "call_function", torch.ops.aten.sym_size.int, (x, d))
            for d in dims]  # fmt: skip


def to_rows(g: fx.Graph, x: fx.Node, width: int) -> fx.Node:
    """``x.reshape(-1, width)``: the ``[tokens, features]`` view the chunked ops take (``x`` itself if 2-D)."""
    return x if tval(x).dim() == 2 else emit(g, "call_method", "reshape", (x, -1, width))


def from_rows(g: fx.Graph, y: fx.Node, like: fx.Node, width: int) -> fx.Node:
    """``y.view(*like.shape[:-1], width)``: an op's ``[tokens, width]`` result given ``like``'s leading dims."""
    lv = tval(like)
    if lv.dim() == 2 and tval(y).dim() == 2:
        return y
    return emit(g, "call_method", "view", (y, *size_args(g, like, range(lv.dim() - 1)), width))


def extract_body(graph: fx.Graph, nodes: list[fx.Node], inputs: list[fx.Node], output) -> fx.GraphModule:
    """Cut ``nodes`` (in graph order) out into a new ``GraphModule`` taking ``inputs`` and returning ``output``.

    Before::  x -> linear(x, w1) -> silu -> mul(., linear(x, w3)) -> linear(., w2) -> (rest of the graph)
    After::   body(x, w1, w3, w2) = linear(mul(silu(linear(x, w1)), linear(x, w3)), w2)

    The body runs on ``[rows, features]`` chunks, so a split along the last dimension is re-addressed as
    ``dim=-1``; anything else that names a dimension was rejected before.
    """
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, inp in enumerate(inputs):
        env[inp] = g.placeholder(f"in{i}")
    for n in nodes:
        new = g.node_copy(n, lambda a: env[a])
        if is_split(n):
            args = list(new.args)
            if "dim" in new.kwargs:
                new.kwargs = {**new.kwargs, "dim": -1}
            elif len(args) > 2:
                args[2] = -1
                new.args = tuple(args)
        env[n] = new
    if isinstance(output, (list, tuple)):
        g.output(type(output)(env[o] for o in output))
    else:
        g.output(env[output])
    gm = fx.GraphModule(torch.nn.Module(), g)
    return gm
