"""How the Dynamo-graph passes classify FX nodes.

The passes run on the graph Dynamo hands to a backend (torch-level ops such as ``torch._C._nn.linear``,
``torch.nn.functional.silu``, ``operator.mul`` and method calls), before AOTAutograd, so one rewrite
changes both the forward and the backward that AOTAutograd derives from it.
"""

from __future__ import annotations

import inspect
import operator

import torch
import torch.nn.functional as F
from torch import fx

from ... import _compat
from ..shared import tval
from .context import CantChunk


def linear_args(n) -> tuple | None:
    """``(x, weight, bias)`` if ``n`` is a linear projection, else ``None``."""
    if not isinstance(n, fx.Node) or n.op != "call_function" or n.target not in _compat.LINEAR_FUNCTIONS:
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


def check_split_on_last_dim(n: fx.Node) -> None:
    v = tval(n.args[0])
    d = split_dim(n)
    if v is None or d not in (-1, v.dim() - 1):
        raise CantChunk(f"{n.name} splits along dim {d}, not the feature dimension")
