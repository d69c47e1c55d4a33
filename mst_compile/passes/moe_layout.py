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

import math
import operator
from dataclasses import dataclass

import sympy
import torch
import torch.nn.functional as F
from torch import fx

from .. import _compat
from .common import CantChunk, is_elementwise, linear_args, tval, val


@dataclass(frozen=True)
class Lay:
    """A node's token layout (NOTE [token-wise MoE])."""

    kind: str  # "rows" | "perm" | "permtok" | "invpend" | "inv" | "hist" | "offs"
    f: int = 1  # rows per token (of the sorted rows for the index kinds)
    sort: fx.Node | None = None  # the sort whose permutation the rows follow / the index belongs to
    ids: int | None = None  # the values are integer expert ids in [0, ids)
    k: int = 1  # permtok: the divisor of ``perm // k``; hist/offs: unused

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


def _dims(d, ndim: int) -> list[int]:
    ds = list(d) if isinstance(d, (list, tuple)) else [d]
    if not all(isinstance(x, int) for x in ds):
        raise NotRowwise("a dimension that is not a constant")
    return [x % ndim if ndim else 0 for x in ds]


def _not_dim0(n: fx.Node, d, ndim: int, what: str) -> None:
    if d is None or 0 in _dims(d, ndim):
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
_INPLACE = {operator.itruediv, operator.imul, operator.iadd, operator.isub}
_INPLACE_METHODS = {"div_", "mul_", "add_", "sub_"}
_CASTS = {"float", "half", "bfloat16", "double", "type_as", "contiguous", "clone"}  # and ``to(dtype)``
_REDUCE_METHODS = {"sum", "mean", "amax", "amin", "prod"}
_REDUCE_FUNCTIONS = {torch.sum, torch.mean, torch.amax, torch.amin, torch.prod}


def is_method(n: fx.Node, *names: str) -> bool:
    return n.op == "call_method" and n.target in names


def is_fn(n: fx.Node, *fns) -> bool:
    return n.op == "call_function" and any(n.target is f for f in fns)


class Layouts:
    """The layouts of one candidate region's nodes, admitted one by one in graph order from ``x``."""

    def __init__(self, x: fx.Node, param_like):
        self.x = x
        self.tokens = tval(x).shape[0]
        self.lay: dict[fx.Node, object] = {x: Lay("rows", 1)}
        self.param_like = param_like  # node -> bool: a weight (no token rows, independent of x)
        self.extra: list[fx.Node] = []  # nodes pulled into the region by a rule (the inverse permutation's arange)
        self.mutated: set[fx.Node] = set()

    # -- helpers -------------------------------------------------------------------------------------------
    def of(self, a):
        """The layout of a region value, ``None`` for a parameter or a constant; raise if neither."""
        if isinstance(a, fx.Node):
            if a in self.lay:
                return self.lay[a]
            if tval(a) is None and not isinstance(val(a), (list, tuple)):
                if isinstance(val(a), (int, float, bool, torch.SymInt)) or val(a) is None:
                    return None  # a size or scalar (sizes naming the token count are re-addressed by the rules)
            if self.param_like(a):
                return None
            raise NotRowwise(f"reads {a.name}, which is neither token-wise from the region input nor a weight")
        if isinstance(a, (list, tuple)):
            for b in a:
                self.of(b)
        return None

    def rows(self, a, what: str) -> Lay:
        lay = self.of(a)
        if not isinstance(lay, Lay) or lay.kind != "rows":
            raise NotRowwise(f"{what} is not a token-row tensor")
        return lay

    # -- the rules -----------------------------------------------------------------------------------------
    def admit(self, n: fx.Node):
        """The layout of ``n`` (raise :class:`NotRowwise` when it is not proven token-wise)."""
        if n.op == "call_function" and n.target is operator.setitem:
            return self._setitem(n)  # its ramp is a factory, neither token-wise nor a weight
        ins = [self.of(a) for a in n.all_input_nodes]
        token_ins = [a for a, lay in zip(n.all_input_nodes, ins) if lay is not None]
        if not token_ins:
            raise NotRowwise(f"{n.name} reads no token-wise value")
        if n.op == "call_function" and n.target is operator.getitem:
            return self._getitem(n)
        if n.op == "call_function" and n.target in _INPLACE or is_method(n, *_INPLACE_METHODS):
            target = n.args[0]
            if target is self.x or target not in self.lay:
                raise NotRowwise(f"{n.name} writes in place into a value that is not the region's own")
            self.mutated.add(target)
            return self._elementwise(n)
        if is_method(n, *_CASTS) or is_elementwise(n):
            lay = self._elementwise(n)
            src = self.lay.get(n.args[0]) if n.args else None
            cast = is_method(n, *_CASTS, "to")  # ``to`` with a dtype only: is_elementwise checked it
            keep_ids = cast and isinstance(src, Lay) and src.ids and len(token_ins) == 1
            return Lay("rows", lay.f, lay.sort, src.ids) if keep_ids else lay
        if is_method(n, "view", "reshape") or is_fn(n, torch.reshape):
            return self._reshape(n)
        if is_method(n, "unsqueeze", "squeeze") or is_fn(n, torch.unsqueeze, torch.squeeze):
            lay = self.rows(n.args[0], n.name)
            d = arg(n, 1, "dim")
            ndim = tval(n).dim() if n.target in ("unsqueeze", torch.unsqueeze) else tval(n.args[0]).dim()
            _not_dim0(n, d, ndim, str(n.target))
            return Lay("rows", lay.f, lay.sort)
        if is_method(n, "repeat_interleave") or is_fn(n, torch.repeat_interleave):
            lay = self.rows(n.args[0], n.name)
            reps, dim = arg(n, 1, "repeats"), arg(n, 2, "dim")
            if not isinstance(reps, int) or dim not in (0, -tval(n.args[0]).dim()) or lay.sort is not None:
                raise NotRowwise(f"{n.name}: repeat_interleave other than a constant count along the token rows")
            if "output_size" in n.kwargs:
                raise NotRowwise(f"{n.name}: repeat_interleave with output_size")
            return Lay("rows", lay.f * reps)
        if linear_args(n) is not None:
            xin, w, b = linear_args(n)
            lay = self.rows(xin, n.name)
            if self.of(w) is not None or self.of(b) is not None:
                raise NotRowwise(f"{n.name}: a projection whose weight is token-wise")
            return Lay("rows", lay.f, lay.sort)
        if is_fn(n, torch.bmm, torch.matmul) or is_method(n, "bmm", "matmul"):
            return self._matmul(n)
        if is_fn(n, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax) or is_method(n, "softmax", "log_softmax"):
            lay = self.rows(n.args[0], n.name)
            _not_dim0(n, arg(n, 1, "dim"), tval(n).dim(), "softmax")
            return Lay("rows", lay.f, lay.sort)
        if is_fn(n, torch.topk) or is_method(n, "topk"):
            lay = self.rows(n.args[0], n.name)
            xv = tval(n.args[0])
            d = arg(n, 2, "dim", -1)
            _not_dim0(n, d, xv.dim(), "topk")
            width = xv.shape[d]
            base = Lay("rows", lay.f, lay.sort)
            return (base, Lay("rows", lay.f, lay.sort, int(width) if isinstance(width, int) else None))
        if is_fn(n, *_REDUCE_FUNCTIONS) or is_method(n, *_REDUCE_METHODS):
            lay = self.rows(n.args[0], n.name)
            _not_dim0(n, arg(n, 1, "dim"), tval(n.args[0]).dim(), f"{n.target} reduction")
            return Lay("rows", lay.f, lay.sort)
        if is_fn(n, torch.chunk, torch.split) or is_method(n, "chunk", "split"):
            lay = self.rows(n.args[0], n.name)
            _not_dim0(n, arg(n, 2, "dim", 0), tval(n.args[0]).dim(), "split")
            return tuple(Lay("rows", lay.f, lay.sort) for _ in val(n))
        if is_fn(n, torch.cat, torch.concat):
            parts = arg(n, 0, "tensors")
            lays = [self.rows(p, n.name) for p in parts]
            _not_dim0(n, arg(n, 1, "dim", 0), tval(n).dim(), "cat")
            if any(not lays[0].same_rows(lay) for lay in lays) or any(tval(p).dim() != tval(n).dim() for p in parts):
                raise NotRowwise(f"{n.name}: cat of differently laid out rows")
            return Lay("rows", lays[0].f, lays[0].sort)
        if is_fn(n, torch.sort) or is_method(n, "sort"):
            lay = self.rows(n.args[0], n.name)
            if tval(n.args[0]).dim() != 1 or lay.sort is not None:
                raise NotRowwise(f"{n.name}: a sort of anything but one value per row (a batch-global sort)")
            return (Lay("rows", lay.f, n, lay.ids), Lay("perm", lay.f, n))
        if n.op == "call_function" and n.target is operator.floordiv:
            lay, k = self.of(n.args[0]), n.args[1]
            if not (isinstance(lay, Lay) and lay.kind == "perm" and isinstance(k, int) and k > 0 and lay.f % k == 0):
                raise NotRowwise(f"{n.name}: integer division of a token value")
            return Lay("permtok", lay.f, lay.sort, k=k)
        if is_fn(n, torch.empty_like):
            lay = self.of(n.args[0])
            if not (isinstance(lay, Lay) and lay.kind == "perm") or len(n.args) > 1 or n.kwargs:
                raise NotRowwise(f"{n.name}: empty_like of a token value")
            return Lay("invpend", lay.f, lay.sort)
        if is_fn(n, F.one_hot):  # one row's classes along a new last dimension
            lay = self.rows(n.args[0], n.name)
            return Lay("rows", lay.f, lay.sort)
        if is_fn(n, torch.histc):
            return self._histc(n)
        if is_fn(n, torch.cumsum) or is_method(n, "cumsum"):
            lay = self.of(n.args[0])
            if isinstance(lay, Lay) and lay.kind == "hist" and arg(n, 1, "dim") in (0, -1):
                return Lay("offs", lay.f, lay.sort, lay.ids)
            lay = self.rows(n.args[0], n.name)
            _not_dim0(n, arg(n, 1, "dim"), tval(n.args[0]).dim(), "cumsum")
            return Lay("rows", lay.f, lay.sort)
        if op_name(n.target) in GROUPED_MM_OPS or is_fn(n, *GROUPED_MM_FUNCTIONS):
            return self._grouped_mm(n)
        raise NotRowwise(f"{n.name} ({getattr(n.target, '__name__', n.target)}) is not known to be token-wise")

    def _elementwise(self, n: fx.Node) -> Lay:
        out = tval(n)
        lays, found = [], None
        for a in n.all_input_nodes:
            lay = self.of(a)
            av = tval(a)
            if lay is None:
                if av is not None and out is not None and av.dim() == out.dim() and av.shape[0] != 1:
                    raise NotRowwise(f"{n.name}: a weight {a.name} broadcast along the token rows")
                continue
            if not isinstance(lay, Lay) or lay.kind != "rows":
                raise NotRowwise(f"{n.name}: arithmetic on a routing index")
            if out is None or av is None or av.dim() != out.dim():
                raise NotRowwise(f"{n.name}: token values of different ranks broadcast together")
            lays.append(lay)
        found = lays[0]
        if any(not found.same_rows(lay) for lay in lays):
            raise NotRowwise(f"{n.name}: combines differently laid out rows")
        return Lay("rows", found.f, found.sort)

    def _reshape(self, n: fx.Node) -> Lay:
        lay = self.rows(n.args[0], n.name)
        if len(n.args) > 1 and isinstance(n.args[1], torch.dtype):
            raise NotRowwise(f"{n.name}: a dtype view")
        iv, ov = tval(n.args[0]), tval(n)
        f2 = ratio(ov.shape[0], self.tokens) if ov.dim() else None
        rest_in, rest_out = list(iv.shape[1:]), list(ov.shape[1:])
        if f2 is None or not all(isinstance(d, int) for d in rest_in + rest_out):
            raise NotRowwise(f"{n.name}: a reshape that does not keep whole tokens on dimension 0")
        if lay.f * math.prod(rest_in) != f2 * math.prod(rest_out):
            raise NotRowwise(f"{n.name}: a reshape that moves elements between tokens")
        if lay.sort is not None and f2 != lay.f:
            raise NotRowwise(f"{n.name}: a reshape of permuted rows")
        return Lay("rows", f2, lay.sort, lay.ids)

    def _matmul(self, n: fx.Node) -> Lay:
        a, b = n.args[0], n.args[1]
        la, lb = self.of(a), self.of(b)
        if isinstance(la, Lay) and isinstance(lb, Lay):
            if not la.same_rows(lb) or tval(a).dim() != 3 or tval(b).dim() != 3:
                raise NotRowwise(f"{n.name}: a batched matmul of differently laid out rows")
            return Lay("rows", la.f, la.sort)
        if isinstance(la, Lay) and la.kind == "rows" and lb is None and tval(b) is not None and tval(b).dim() == 2:
            return Lay("rows", la.f, la.sort)
        raise NotRowwise(f"{n.name}: a matmul that is not per row")

    def _getitem(self, n: fx.Node):
        src, idx = n.args[0], n.args[1]
        lay = self.of(src)
        if isinstance(lay, tuple):  # an element of topk / sort / chunk
            return lay[idx]
        il = self.of(idx) if isinstance(idx, fx.Node) else None
        if lay is None and isinstance(il, Lay) and il.kind == "rows" and tval(idx).dim() == 1:
            if tval(idx).dtype not in (torch.int64, torch.int32):
                raise NotRowwise(f"{n.name}: a weight indexed by a non-integer tensor")
            return Lay("rows", il.f, il.sort)  # W[expert_ids]: one weight slice per row
        if not isinstance(lay, Lay) or lay.kind != "rows":
            raise NotRowwise(f"{n.name}: indexes a routing value")
        if isinstance(il, Lay):
            if il.kind == "perm" and lay.sort is None and lay.f == il.f:
                return Lay("rows", il.f, il.sort, lay.ids)
            if il.kind == "permtok" and lay.sort is None and lay.f * il.k == il.f:
                return Lay("rows", il.f, il.sort, lay.ids)
            if il.kind == "inv" and lay.sort is il.sort and lay.f == il.f:
                return Lay("rows", il.f, None, lay.ids)
            raise NotRowwise(f"{n.name}: rows gathered by an index that is not a proven per-token permutation")
        items = list(idx) if isinstance(idx, tuple) else [idx]
        if any(isinstance(i, fx.Node) for i in items):
            raise NotRowwise(f"{n.name}: tensor indexing of token rows")
        first = items[0] if items else slice(None)
        ndim = tval(src).dim()
        if first == slice(None, None, None):
            return Lay("rows", lay.f, lay.sort)
        explicit = [i for i in items if i is not None and i is not Ellipsis]
        if first is Ellipsis and len(explicit) < ndim:
            return Lay("rows", lay.f, lay.sort)
        raise NotRowwise(f"{n.name}: indexing along the token rows")

    def _setitem(self, n: fx.Node):
        inv, idx, value = n.args
        li, lp = self.of(inv), self.of(idx) if isinstance(idx, fx.Node) else None
        if not (isinstance(li, Lay) and li.kind == "invpend" and isinstance(lp, Lay) and lp.kind == "perm"
                and lp.sort is li.sort):  # fmt: skip
            raise NotRowwise(f"{n.name}: an indexed write into a token value")
        if not (isinstance(value, fx.Node) and is_fn(value, torch.arange) and len(value.users) == 1):
            raise NotRowwise(f"{n.name}: the inverse permutation is not written from arange(len(perm))")
        end = value.args[0] if len(value.args) == 1 else None
        length = tval(idx).shape[0]
        if end is None or set(value.kwargs) - {"device", "dtype"}:
            raise NotRowwise(f"{n.name}: arange with a start or step")
        end_v = val(end) if isinstance(end, fx.Node) else end
        if not (ratio(end_v, length) == 1):
            raise NotRowwise(f"{n.name}: the inverse permutation's arange does not cover the permutation")
        if any(u is not n and _before(u, n) for u in inv.users):
            raise NotRowwise(f"{n.name}: the inverse permutation is read before it is written")
        self.lay[inv] = Lay("inv", li.f, li.sort)
        self.lay[value] = Lay("arange", li.f)
        self.extra.append(value)
        return Lay("effect")

    def _histc(self, n: fx.Node) -> Lay:
        lay = self.of(n.args[0])
        bins, lo, hi = arg(n, 1, "bins", 100), arg(n, 2, "min", 0), arg(n, 3, "max", 0)
        if not (isinstance(lay, Lay) and lay.kind == "rows" and lay.sort is not None and lay.ids):
            raise NotRowwise(f"{n.name}: a histogram over token values (not the sorted expert ids)")
        if (bins, lo, hi) != (lay.ids, 0, lay.ids - 1) or tval(n.args[0]).dim() != 1:
            raise NotRowwise(f"{n.name}: a histogram whose bins are not the experts 0..{lay.ids - 1}")
        return Lay("hist", lay.f, lay.sort, lay.ids)

    def _grouped_mm(self, n: fx.Node) -> Lay:
        a, w = n.args[0], n.args[1]
        offs = arg(n, 2, "offs")
        lay, lo = self.rows(a, n.name), self.of(offs)
        if self.of(w) is not None or tval(w) is None or tval(w).dim() != 3:
            raise NotRowwise(f"{n.name}: a grouped matmul whose weight is not a parameter stack")
        if not (isinstance(lo, Lay) and lo.kind == "offs" and lay.sort is lo.sort and lay.f == lo.f):
            raise NotRowwise(f"{n.name}: grouped matmul offsets not counted from these rows' sorted expert ids")
        if tval(w).shape[0] != lo.ids or set(n.kwargs) - {"offs"} or len(n.args) > 3:
            raise NotRowwise(f"{n.name}: grouped matmul over {tval(w).shape[0]} groups, offsets for {lo.ids}")
        return Lay("rows", lay.f, lay.sort)


def _before(a: fx.Node, b: fx.Node) -> bool:
    """Whether ``a`` comes before ``b`` in their graph."""
    for n in b.graph.nodes:
        if n is a:
            return True
        if n is b:
            return False
    return False
