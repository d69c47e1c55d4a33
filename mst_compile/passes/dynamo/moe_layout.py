"""The token-layout proof behind the MoE pass: which nodes of a mixture-of-experts block are token-wise.

NOTE [token-wise MoE]: a region may be chunked over tokens only if every one of its values is *token-wise*:
row ``r`` of the value depends on the region input's rows of one token only, and the row-to-token map is
known. Each admitted node gets a :class:`Lay`:

- ``rows(f)``: dimension 0 has ``T * f`` rows, token-major (rows ``t*f .. t*f+f-1`` belong to token ``t``).
  ``repeat_interleave(k, dim=0)`` turns ``rows(f)`` into ``rows(f*k)``; a ``view``/``reshape`` keeps it when its
  new dimension 0 is a whole multiple of ``T`` and one token's elements stay together (the flat order is
  unchanged); ops along any other dimension (softmax, top-k, sums, splits, ``unsqueeze(-1)``) keep it; linear
  and batched matmuls keep it; a parameter indexed by a row tensor (``W[expert_ids]``) takes its layout.
- ``perm`` / ``permtok`` / ``invpend`` / ``inv`` / ``hist`` / ``offs`` / ``arange`` / ``effect``: the
  routing indices of the grouped form below (a permutation, ``perm // k``, the inverse permutation before and
  after it is written, the expert histogram, its offsets, the ramp written into the inverse, the write).
- ``sel`` / ``selc`` / ``tdim`` / ``size``: the token and other coordinates of a ``torch.where(mask)``
  selection, a mask stack whose tokens are on another dimension, a selection's size; rows gathered by a
  selection are ``rows(1, sort=where)`` (NOTE [selected rows], ``moe_select.py``).
- ``rows(f, sort=s)``: the same rows permuted by the permutation ``perm`` of sort ``s`` (row ``r`` is the
  unpermuted row ``perm[r]``). Only HF's grouped-experts spelling is accepted: ``perm`` from ``sort`` of a 1-D
  ``rows(f)`` tensor, rows gathered by ``perm`` (or by ``perm // k`` from a ``rows(f / k)`` tensor), a grouped
  matmul whose offsets are ``cumsum(histc(sorted ids, bins=E, min=0, max=E-1))`` with ids proven in
  ``[0, E)`` (they come from a top-k over an ``E``-wide row), so each row meets its own expert's weight; and
  the inverse permutation built as ``inv = empty_like(perm); inv[perm] = arange(len(perm))``, which
  restores ``rows(f)``. Under chunking each chunk sorts its own rows: a different permutation, the same rows.

Anything else is *not admitted*: an op that reads dimension 0 (a sum, cumsum or sort over tokens: the
capacity counting of capacity-factor routing, a batch-global sort whose permutation is not undone), a
tensor index other than the ones above, a value mixing tokens, a tensor neither token-wise nor a parameter,
random ops, in-place writes to the region's input or to a parameter, a size computed outside the region.
A node that is not admitted is outside the region; what it reads from the region is a region output, and a
region output must be a plain ``rows(1)`` floating-point tensor (the block's output, the router logits).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import sympy
import torch
import torch.nn.functional as F
from torch import fx

from ... import _compat
from .context import CantChunk


@dataclass(frozen=True)
class Lay:
    """A node's token layout (NOTE [token-wise MoE])."""

    kind: str  # "rows" | "perm" | "permtok" | "invpend" | "inv" | "hist" | "offs" | "sel" | "selc" | "tdim" | "size"
    f: int = 1  # rows per token (of the sorted rows for the index kinds)
    sort: fx.Node | None = None  # the sort (or selection) whose order the rows follow / the index belongs to
    ids: int | None = None  # the values are integer expert ids in [0, ids)
    k: int = 1  # permtok: the divisor of ``perm // k``; selc: the coordinate; tdim: the tokens' dimension

    def same_rows(self, other: "Lay") -> bool:
        return self.kind == other.kind == "rows" and self.f == other.f and self.sort is other.sort


class NotRowwise(CantChunk):
    """The node cannot be admitted: it is not proven token-wise."""


def ratio(a, t) -> int | None:
    """``a / t`` as a positive whole number (ints or symbolic sizes), else ``None``."""
    if isinstance(a, int) and isinstance(t, int):
        return a // t if t > 0 and a % t == 0 and a > 0 else None
    q = sympy.simplify(sympy.sympify(_compat.sym_expr(a)) / sympy.sympify(_compat.sym_expr(t)))
    return int(q) if q.is_Integer and int(q) > 0 else None


def arg(n: fx.Node, i: int, name: str, default=None):
    """Argument ``i`` (positional, counting ``self`` of a method) or keyword ``name`` of ``n``."""
    if name in n.kwargs:
        return n.kwargs[name]
    return n.args[i] if len(n.args) > i else default


def dims(d, ndim: int) -> list[int]:
    ds = list(d) if isinstance(d, (list, tuple)) else [d]
    if not all(isinstance(x, int) for x in ds):
        raise NotRowwise("a dimension that is not a constant")
    return [x % ndim if ndim else 0 for x in ds]


def not_dim0(n: fx.Node, d, ndim: int, what: str) -> None:
    if d is None or 0 in dims(d, ndim):
        raise NotRowwise(f"{n.name} ({what}) works along the token dimension")


def op_name(target) -> str:
    """``namespace::name`` of a torch op (packet or overload), else ``""``."""
    name = getattr(target, "_qualified_op_name", None)
    if name is None and hasattr(target, "_schema"):
        name = target._schema.name
    return name or ""


#: grouped matmuls whose row ``r`` is ``input[r] @ weight[group(r)]``, groups cut by cumulative ``offs``
GROUPED_MM_OPS = {"transformers::grouped_mm_fallback", "aten::_grouped_mm"}
GROUPED_MM_FUNCTIONS = tuple(f for f in (getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)) if f)
INPLACE = {operator.itruediv, operator.imul, operator.iadd, operator.isub}
INPLACE_METHODS = {"div_", "mul_", "add_", "sub_"}
CASTS = {"float", "half", "bfloat16", "double", "type_as", "contiguous", "clone"}  # and ``to(dtype)``
REDUCE_METHODS = {"sum", "mean", "amax", "amin", "prod"}
REDUCE_FUNCTIONS = {torch.sum, torch.mean, torch.amax, torch.amin, torch.prod}


def is_method(n: fx.Node, *names: str) -> bool:
    return n.op == "call_method" and n.target in names


def is_fn(n: fx.Node, *fns) -> bool:
    return n.op == "call_function" and any(n.target is f for f in fns)
