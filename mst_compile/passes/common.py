"""Shared pieces of the graph passes: the typed failure, the pass context, and how FX nodes are classified.

The passes run on the graph Dynamo hands to a backend (torch-level ops such as ``torch._C._nn.linear``,
``torch.nn.functional.silu``, ``operator.mul`` and method calls), before AOTAutograd, so one rewrite
changes both the forward and the backward that AOTAutograd derives from it.
"""

from __future__ import annotations

import inspect
import logging
import warnings
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx

from .. import _compat
from ..config import MSTConfig
from ..report import Region


class CantChunk(Exception):
    """A region cannot be rewritten; the message says why. Caught by the pass: the region stays as it was."""


def skip(rec: Region, e: Exception) -> None:
    """Record why a region is left alone. ``CantChunk`` is an expected outcome (logged with the report);
    any other exception is a bug in a pass, so it also warns (once per region), and the region stays as is."""
    if isinstance(e, CantChunk):
        rec.reason = str(e)
        return
    rec.reason = f"internal error in the {rec.kind} pass: {type(e).__name__}: {e}"
    warnings.warn(f"mst: {rec.kind} region at {rec.anchor} skipped: {rec.reason}", stacklevel=3)


@dataclass
class PassContext:
    config: MSTConfig
    grad_enabled: bool = True
    regions: list[Region] = field(default_factory=list)
    claimed: set = field(default_factory=set)  # nodes already part of a rewritten or rejected region
    # graph-output bridges for logits returned next to a fused loss (see logits.py)
    logits_outputs: list = field(default_factory=list)
    # False when nothing can wrap the compiled function's outputs (the Inductor-pass mode)
    allow_logits_output: bool = True


def source_hash(*modules) -> str:
    """A hash of these modules' source: the ``uuid`` of an Inductor custom pass, so that Inductor's caches
    never serve a graph one version of a pass rewrote to another version."""
    import hashlib

    return hashlib.sha1("".join(inspect.getsource(m) for m in modules).encode()).hexdigest()


class InductorPass(_compat.CustomGraphPass):
    """One of mst's Inductor custom passes: ``run(graph)`` rewrites in place; a failure is a missed saving,
    never a failed compile (logged, graph left as the pass left it: every pass writes valid graphs step by
    step). ``uuid`` keys Inductor's cache: the defining module's source and ``key()``."""

    #: what the warning calls the pass
    what = "an mst pass"

    def run(self, graph: fx.Graph) -> object:
        raise NotImplementedError

    def key(self) -> str:
        return ""

    def __call__(self, graph: fx.Graph) -> None:
        try:
            self.run(graph)
        except Exception:  # noqa: BLE001
            logging.getLogger("mst_compile").warning("mst: %s failed; graph left as it was", self.what, exc_info=True)

    def uuid(self):
        import sys

        return source_hash(sys.modules[type(self).__module__]) + self.key()


def val(n):
    """The fake value Dynamo recorded for a node (``None`` for non-tensor or missing metadata)."""
    if not isinstance(n, fx.Node):
        return None
    v = n.meta.get("example_value", n.meta.get("val"))
    return v


def tval(n) -> torch.Tensor | None:
    v = val(n)
    return v if isinstance(v, torch.Tensor) else None


LINEAR_TARGETS = (torch._C._nn.linear, F.linear)


def linear_args(n) -> tuple | None:
    """``(x, weight, bias)`` if ``n`` is a linear projection, else ``None``."""
    if not isinstance(n, fx.Node) or n.op != "call_function" or n.target not in LINEAR_TARGETS:
        return None
    args = list(n.args) + [None] * (3 - len(n.args))
    x = n.kwargs.get("input", args[0])
    w = n.kwargs.get("weight", args[1])
    b = n.kwargs.get("bias", args[2])
    return x, w, b


# Row-wise elementwise ops: each output row depends only on the same row of the token-shaped inputs.
_ELEMENTWISE_FUNCTIONS = {
    operator.mul, operator.add, operator.sub, operator.truediv, operator.neg, operator.pow,
    torch.mul, torch.add, torch.sub, torch.div, torch.neg, torch.pow, torch.tanh, torch.sigmoid, torch.relu,
    torch.exp, torch.erf, torch.square, torch.sqrt, torch.rsqrt, torch.clamp, torch.abs,
    F.silu, F.gelu, F.relu, F.sigmoid, F.tanh, F.leaky_relu, F.mish, F.softplus, F.hardswish, F.elu,
    F.selu, F.relu6, F.hardtanh, F.hardsigmoid, F.logsigmoid, F.celu,
}  # fmt: skip
_ELEMENTWISE_METHODS = {
    "float", "half", "bfloat16", "double", "to", "type_as", "mul", "add", "sub", "div", "neg", "pow", "tanh",
    "sigmoid", "relu", "exp", "clamp", "abs", "sqrt", "rsqrt", "square", "contiguous", "__mul__", "__add__",
    "__rmul__", "__radd__", "__truediv__", "__sub__",
}  # fmt: skip
_SPLIT_FUNCTIONS = {torch.chunk, torch.split, torch.tensor_split}
_SPLIT_METHODS = {"chunk", "split", "tensor_split"}


def is_split(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in _SPLIT_FUNCTIONS) or (
        n.op == "call_method" and n.target in _SPLIT_METHODS
    )


def split_dim(n: fx.Node) -> int:
    dim = n.kwargs.get("dim")
    if dim is None:
        dim = n.args[2] if len(n.args) > 2 else 0
    return dim


def is_elementwise(n: fx.Node) -> bool:
    if n.op == "call_function" and n.target in _ELEMENTWISE_FUNCTIONS:
        return True
    if n.op == "call_method" and n.target in _ELEMENTWISE_METHODS:
        if n.target == "to":
            # dtype conversion only: no device moves, no copies to other layouts
            rest = list(n.args[1:]) + list(n.kwargs.values())
            return all(isinstance(a, torch.dtype) or a is None or isinstance(a, bool) for a in rest)
        return True
    if n.op == "call_function" and n.target is F.dropout:
        p = n.kwargs.get("p", n.args[1] if len(n.args) > 1 else 0.5)
        training = n.kwargs.get("training", n.args[2] if len(n.args) > 2 else True)
        # Recompute in backward must see the same values: only a no-op dropout is row-wise deterministic.
        return p == 0.0 or training is False
    return False


def is_getitem_of_split(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node) and (
        is_split(n.args[0])
    )


def is_weight_like(n) -> bool:
    """A tensor without token dimensions: it may broadcast along the feature dimension only."""
    v = tval(n)
    return v is not None and v.dim() <= 1


def numel_bytes(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    return _compat.size_hint(t.numel()) * t.element_size()


def bind_cross_entropy(n: fx.Node) -> dict | None:
    if n.op != "call_function" or n.target is not F.cross_entropy:
        return None
    sig = inspect.signature(F.cross_entropy)
    bound = sig.bind(*n.args, **n.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


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


def check_split_on_last_dim(n: fx.Node) -> None:
    v = tval(n.args[0])
    d = split_dim(n)
    if v is None or d not in (-1, v.dim() - 1):
        raise CantChunk(f"{n.name} splits along dim {d}, not the feature dimension")


def _ambient_autocast() -> tuple | None:
    for device in ("cuda", "cpu"):
        if torch.is_autocast_enabled(device):
            return (device, torch.get_autocast_dtype(device))
    return None


def autocast_states(graph: fx.Graph) -> dict:
    """``node -> (device_type, dtype) | None``: the autocast each node runs under.

    Dynamo records ``with torch.autocast(...)`` inside the compiled code as ``_enter_autocast`` /
    ``_exit_autocast`` calls; autocast already on around the compiled call is the ambient state (Dynamo guards
    on it, so it is the state at run time too)."""
    stack = [_ambient_autocast()]
    states = {}
    for n in graph.nodes:
        name = getattr(n.target, "__name__", "") if n.op == "call_function" else ""
        if name == "_enter_autocast":
            device, dtype, enabled = (list(n.args) + [None, None, True])[:3]
            if dtype is None and enabled:
                dtype = torch.get_autocast_dtype(device)
            stack.append((device, dtype) if enabled else None)
        elif name == "_exit_autocast" and len(stack) > 1:
            stack.pop()
        states[n] = stack[-1]
    return states


def grad_states(graph: fx.Graph, ambient: bool) -> dict:
    """``node -> bool``: whether grad mode is on where each node runs.

    NOTE [grad mode per node]: Dynamo records ``with torch.enable_grad()`` / ``torch.no_grad()`` inside the
    compiled code as ``torch._C._set_grad_enabled`` calls in the graph; ``ambient`` is the mode around the
    compiled call (Dynamo guards on it). A pass reads the mode of the region's own nodes, never the caller's:
    a forward that enables grad inside, called under ``no_grad``, still needs every gradient."""
    state, states = ambient, {}
    for n in graph.nodes:
        if n.op == "call_function" and getattr(n.target, "__name__", "") == "_set_grad_enabled" and n.args:
            state = bool(n.args[0])
        states[n] = state
    return states


def region_grad(nodes, ctx: "PassContext", graph: fx.Graph) -> bool:
    """The one grad mode of a region's nodes (NOTE [grad mode per node]); a region straddling a change of it
    can't be chunked."""
    states = grad_states(graph, ctx.grad_enabled)
    found = {states.get(n, ctx.grad_enabled) for n in nodes}
    if len(found) > 1:
        raise CantChunk("the region crosses a change of grad mode")
    return found.pop() if found else ctx.grad_enabled


def region_autocast(nodes, states: dict) -> tuple | None:
    """The one autocast state of a region's nodes; a region straddling an autocast boundary can't be chunked."""
    found = {states.get(n) for n in nodes}
    if len(found) > 1:
        raise CantChunk(f"the region crosses an autocast boundary ({sorted(map(str, found))})")
    return found.pop() if found else None


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
