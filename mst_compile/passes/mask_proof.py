"""The symbolic model behind the causal-mask pass: a tensor as one sympy expression of its index.

Every tensor is one expression of its element index (one integer symbol per dimension, counted from the right,
so broadcasting needs no renaming; a size-1 dimension's symbol is replaced by 0). ``arange`` is its index,
indexing substitutes, comparisons give relations, ``diff`` / ``cumsum`` are evaluated where the result is a
closed form; anything else raises ``CantChunk``. Symbolic sizes (dynamic shapes) are sympy symbols too, so a
proof holds for every length.

NOTE [causal-mask proof]: the symbolic value of a tensor is its true value only if every step is exact, so each
step is checked, not assumed:
- every index symbol ranges over ``[0, size)`` of its tensor's dimension; a size symbol (a dimension of a
  graph input) over ``[1, 2**48]`` (from 0 if it may be 0; no device holds a longer dimension); any other
  symbol (a value read from a runtime tensor, an int argument) is unbounded, and a mask that depends on one
  is left alone;
- every index expression is proven inside ``[0, size)``, or proven inside ``[-size, 0)`` and then wraps
  exactly (``+ size``); an index that may fall on either side is rejected (``pos[arange(s) - 1]``);
- every number a node computes, and every operand it converts, is proven exact in the node's dtype: inside the
  range of an integer dtype (no int8 / uint8 wrap) or of the integers a float dtype holds exactly (2**11 in
  float16); booleans are never used as numbers (``(a > b) != 0`` is not the relation ``a > b``);
- only ``torch`` / ``operator`` / ``Tensor`` functions are modelled, matched by identity, not by name.
Belt and braces (``mask_eval``): before rewriting, the mask's subgraph is also run with concrete small lengths
(or at its one static length, when small) and compared with ``tril``; any disagreement leaves the mask alone.
"""

from __future__ import annotations

import operator

import sympy
import torch
from torch import fx

from .. import _compat
from .common import CantChunk, val

IDX = [sympy.Symbol(f"i{k}", integer=True, nonnegative=True) for k in range(8)]  # i0 = last dimension
_TMP = [sympy.Symbol(f"t{k}", integer=True, nonnegative=True) for k in range(8)]
SIZE_MAX = 2**48  # the longest dimension a size symbol can stand for (NOTE [causal-mask proof])

# the integers each dtype holds exactly, every one of them: ``[lo, hi]``
_EXACT = {
    torch.uint8: (0, 2**8 - 1), torch.int8: (-(2**7), 2**7 - 1), torch.int16: (-(2**15), 2**15 - 1),
    torch.int32: (-(2**31), 2**31 - 1), torch.int64: (-(2**63), 2**63 - 1),
    torch.float16: (-(2**11), 2**11), torch.bfloat16: (-(2**8), 2**8), torch.float32: (-(2**24), 2**24),
    torch.float64: (-(2**53), 2**53),
}  # fmt: skip


class _V:
    """A tensor (or scalar) as one sympy expression of its index; ``shape`` holds sympy sizes."""

    __slots__ = ("expr", "shape")

    def __init__(self, expr, shape=()):
        self.expr = sympy.sympify(expr)
        self.shape = tuple(shape)
        for k, size in enumerate(reversed(self.shape)):  # a size-1 dimension has index 0
            if size == 1:
                self.expr = self.expr.subs(IDX[k], 0)

    @property
    def is_bool(self) -> bool:
        # not ``Boolean``: sympy's Symbol subclasses it
        return isinstance(self.expr, (sympy.core.relational.Relational, sympy.logic.boolalg.BooleanAtom,
                                      sympy.logic.boolalg.BooleanFunction))  # fmt: skip


def sym_of(x):
    return sympy.sympify(_compat.sym_expr(x))


def shape_of(n) -> tuple:
    v = val(n)
    if not isinstance(v, torch.Tensor):
        raise CantChunk(f"{n} has no tensor metadata")
    return tuple(sym_of(s) for s in v.shape)


def _remap(expr, old_rank: int, new_rank: int, where: dict):
    """Rename index symbols: old dimension ``d`` (from the left) becomes the expression ``where[d]``, written in
    the new tensor's index symbols; all substitutions at once (old and new symbols share names)."""
    subs = {IDX[old_rank - 1 - d]: e for d, e in where.items()}
    tmp = {IDX[k]: _TMP[k] for k in range(new_rank)}
    subs = {s: sympy.sympify(e).xreplace(tmp) for s, e in subs.items()}
    back = {_TMP[k]: IDX[k] for k in range(new_rank)}
    return expr.xreplace(subs).xreplace(back)


def affine_bounds(expr, box: dict) -> tuple:
    """``(lo, hi)`` of ``expr`` over ``box`` (``symbol -> (lo, hi)``): ``expr`` must be affine in the box's
    symbols, each coefficient of known sign (coefficients and bounds may hold other symbols)."""
    expr = sympy.expand(expr)
    syms = sorted((s for s in box if s in expr.free_symbols), key=str)
    if not syms:
        return expr, expr
    try:
        poly = sympy.Poly(expr, *syms)
    except sympy.PolynomialError:
        raise CantChunk(f"{expr} is not a polynomial in {syms}") from None
    if poly.total_degree() > 1:
        raise CantChunk(f"{expr} is not affine in {syms}")
    lo = hi = poly.coeff_monomial(1)
    for s in syms:
        c, (a, b) = poly.coeff_monomial(s), box[s]
        if c.is_nonnegative:
            lo, hi = lo + c * a, hi + c * b
        elif c.is_nonpositive:
            lo, hi = lo + c * b, hi + c * a
        else:
            raise CantChunk(f"the coefficient {c} of {s} in {expr} has no known sign")
    return sympy.expand(lo), sympy.expand(hi)


def _index_box(shape) -> dict:
    r = len(shape)
    return {IDX[k]: (0, shape[r - 1 - k] - 1) for k in range(r)}


def size_symbols(graph: fx.Graph) -> dict:
    """``symbol -> (lo, hi)`` for every symbol that is a dimension of a graph input (NOTE [causal-mask proof])."""
    out = {}
    for p in graph.find_nodes(op="placeholder"):
        v = val(p)
        for d in v.shape if isinstance(v, torch.Tensor) else ():
            e = sym_of(d)
            if isinstance(e, sympy.Symbol) and e.is_nonnegative:
                out[e] = (1 if e.is_positive else 0, SIZE_MAX)
    return out


class Interp:
    """Symbolic evaluation of the nodes a mask depends on; anything unknown or inexact raises ``CantChunk``."""

    def __init__(self, sizes: dict | None = None):
        self.env: dict[fx.Node, _V] = {}
        self.sizes = dict(sizes or {})

    def __call__(self, a):
        if isinstance(a, fx.Node):
            if a not in self.env:
                self.env[a] = self._node(a)
            return self.env[a]
        if isinstance(a, (bool, int, torch.SymInt, torch.SymBool)):
            return _V(sym_of(a))
        raise CantChunk(f"unsupported constant {a!r} in the mask")

    # -- ranges ------------------------------------------------------------------------------------------
    def nonneg(self, e) -> bool:
        """``e >= 0`` for every value of the size symbols (and of no other symbol)."""
        e = sympy.expand(e)
        if e.is_number:
            return bool(e >= 0)
        if e.free_symbols - self.sizes.keys():
            return False
        try:
            lo, _ = affine_bounds(e, self.sizes)
        except CantChunk:
            return e.is_nonnegative is True
        return bool(lo.is_number and lo >= 0)

    def bounds(self, expr, shape) -> tuple[int, int]:
        """Numeric ``(lo, hi)`` of ``expr`` over its index box and the size symbols' ranges."""
        lo, hi = affine_bounds(expr, _index_box(shape))
        lo, hi = affine_bounds(lo, self.sizes)[0], affine_bounds(hi, self.sizes)[1]
        if not (lo.is_number and hi.is_number):
            raise CantChunk(f"{expr} depends on {sorted(map(str, (lo + hi).free_symbols))}, which have no bound")
        return lo, hi

    def index(self, e, size, shape, what: str):
        """``e`` as an index into a dimension of ``size``: proven in ``[0, size)``, or in ``[-size, 0)`` (wraps
        exactly to ``e + size``); anything else raises."""
        lo, hi = affine_bounds(e, _index_box(shape))
        if self.nonneg(lo) and self.nonneg(size - 1 - hi):
            return e
        if self.nonneg(-1 - hi) and self.nonneg(lo + size):
            return e + size
        raise CantChunk(f"{what}: the index {e} is not proven inside [0, {size}) nor inside [-{size}, 0)")

    def fits(self, x: _V, shape, dtype, what: str) -> None:
        """``x``'s values are exact in ``dtype`` (bool: ``x`` is a relation)."""
        if dtype == torch.bool:
            if not x.is_bool:
                raise CantChunk(f"{what}: a boolean tensor whose value is the number {x.expr}")
            return
        if x.is_bool:
            raise CantChunk(f"{what}: a boolean used as a number of dtype {dtype}")
        rng = _EXACT.get(dtype)
        if rng is None or x.expr.is_integer is not True:
            raise CantChunk(f"{what}: {x.expr} in dtype {dtype} is not modelled")
        lo, hi = self.bounds(x.expr, shape)
        if lo < rng[0] or hi > rng[1]:
            raise CantChunk(f"{what}: values in [{lo}, {hi}] are not all exact in {dtype}")

    # -- nodes -------------------------------------------------------------------------------------------
    def _node(self, n: fx.Node) -> _V:
        v = val(n)
        if isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool):
            e = sym_of(v)  # sizes and integer arithmetic on them: their value is known symbolically
            if e.free_symbols - self.sizes.keys():
                raise CantChunk(f"the mask depends on the runtime value {n.name} = {e}")
            return _V(e)
        if n.op in ("placeholder", "get_attr"):
            raise CantChunk(f"the mask depends on the runtime tensor {n.name}")
        fn = _RULES.get(_op_name(n))
        if fn is None:
            raise CantChunk(f"the mask uses {n.target}, which the proof does not model")
        out = fn(self, n)
        if isinstance(v, torch.Tensor):
            out = _V(out.expr, shape_of(n))  # re-normalize against the recorded shape
            self.fits(out, out.shape, v.dtype, n.name)
        return out


def _op_name(n: fx.Node) -> str | None:
    """The name a rule is registered under: a method's name, or a function's when it *is* that ``torch`` /
    ``operator`` / ``Tensor`` function (a custom op or a user function that shares the name is not)."""
    if n.op == "call_method":
        return n.target
    if n.op != "call_function":
        return None
    name = getattr(n.target, "__name__", None)
    if name and any(getattr(m, name, None) is n.target for m in (torch, operator, torch.Tensor)):
        return name
    return None


def _operand_dummy(a):
    """A stand-in for ``torch.result_type``: a tensor operand's dtype and rank, a scalar as a Python scalar."""
    v = val(a) if isinstance(a, fx.Node) else a
    if isinstance(v, torch.Tensor):
        return torch.empty((1,) * v.dim(), dtype=v.dtype, device="meta")
    return True if isinstance(v, (bool, torch.SymBool)) else 0


def _operands_fit(ip: Interp, n, args, xs, dtype) -> None:
    """Each operand is exact in the dtype the op computes in (it is converted to it first)."""
    if not isinstance(val(n), torch.Tensor):
        return
    for a, x in zip(args, xs):
        ip.fits(x, shape_of(n), dtype, f"{n.name} (operand {getattr(a, 'name', a)})")


def _check_kwargs(n, allowed=(), nargs: int | None = None) -> None:
    extra = set(n.kwargs) - set(allowed)
    if extra or (nargs is not None and len(n.args) != nargs):
        raise CantChunk(f"{n.name}: {len(n.args)} arguments, keywords {sorted(n.kwargs)}: a call form not modelled")


def _arange(ip: Interp, n):
    _check_kwargs(n, ("start", "end", "step", "dtype", "device", "layout", "pin_memory", "requires_grad"))
    if len(n.args) == 1 and "end" not in n.kwargs:
        start, step = 0, n.kwargs.get("step", 1)
    else:
        bound = dict(zip(("start", "end", "step"), n.args))
        bound.update({k: n.kwargs[k] for k in ("start", "end", "step") if k in n.kwargs})
        start, step = bound.get("start", 0), bound.get("step", 1)
    start, step = ip(start).expr, ip(step).expr
    if start.is_integer is not True or step.is_integer is not True:
        raise CantChunk(f"{n.name}: an arange with non-integer start or step")
    return _V(start + step * IDX[0])


def _arith(op):
    def rule(ip: Interp, n):
        _check_kwargs(n, ("alpha",), nargs=2)
        args = n.args
        x, y = (ip(a) for a in args)
        if x.is_bool or y.is_bool or n.kwargs.get("alpha", 1) != 1:
            raise CantChunk(f"arithmetic on booleans / scaled arithmetic in {n.name}")
        if isinstance(val(n), torch.Tensor):
            _operands_fit(ip, n, args, (x, y), val(n).dtype)
        return _V(op(x.expr, y.expr))

    return rule


def _compare(rel):
    def rule(ip: Interp, n):
        _check_kwargs(n, nargs=2)
        args = n.args
        xs = [ip(a) for a in args]
        if any(x.is_bool for x in xs):
            raise CantChunk(f"{n.name} compares a boolean (a relation is not a number)")
        if isinstance(val(n), torch.Tensor):
            _operands_fit(ip, n, args, xs, torch.result_type(*map(_operand_dummy, args)))
        return _V(rel(xs[0].expr, xs[1].expr))

    return rule


def _logic(op):
    def rule(ip: Interp, n):
        _check_kwargs(n, nargs=2)
        xs = [ip(a) for a in n.args]
        if not all(x.is_bool for x in xs):
            raise CantChunk(f"bitwise logic on integers in {n.name}")
        return _V(op(*(x.expr for x in xs)))

    return rule


def _not(ip: Interp, n):
    _check_kwargs(n, nargs=1)
    x = ip(n.args[0])
    if not x.is_bool:
        raise CantChunk(f"bitwise not of integers in {n.name}")
    return _V(sympy.Not(x.expr))


def _neg(ip: Interp, n):
    _check_kwargs(n, nargs=1)
    x = ip(n.args[0])
    if x.is_bool:
        raise CantChunk(f"{n.name} negates a boolean")
    return _V(-x.expr)


def _same(ip: Interp, n):
    """Ops that keep every element's value: device moves, expand, a same-dtype ``to``."""
    src = n.args[0]
    if not isinstance(val(src), torch.Tensor) or val(src).dtype != val(n).dtype:
        raise CantChunk(f"{n.name} changes the dtype")
    return ip(src)


def _ones(ip: Interp, n):
    v = val(n)
    return _V(sympy.true if v.dtype == torch.bool else 1)


def _insert_dims(x: _V, rank_in: int, new_dims: list[int], rank_out: int) -> sympy.Basic:
    """``x`` with size-1 dimensions inserted at output positions ``new_dims`` (from the left)."""
    old = [d for d in range(rank_out) if d not in new_dims]
    return _remap(x.expr, rank_in, rank_out, {d: IDX[rank_out - 1 - o] for d, o in enumerate(old)})


def _unsqueeze(ip: Interp, n):
    x = ip(n.args[0])
    rank = len(x.shape)
    d = n.args[1] if len(n.args) > 1 else n.kwargs["dim"]
    d = d + rank + 1 if d < 0 else d
    return _V(_insert_dims(x, rank, [d], rank + 1))


def _is_index_tensor(i) -> bool:
    return isinstance(i, fx.Node) and isinstance(val(i), torch.Tensor)


def _getitem(ip: Interp, n):
    src, idx = n.args
    if not isinstance(val(src), torch.Tensor):
        raise CantChunk(f"{n.name} indexes a non-tensor")
    x = ip(src)
    out_shape = shape_of(n)
    rank_in, rank_out = len(x.shape), len(out_shape)
    idx = idx if isinstance(idx, tuple) else (idx,)
    for i in idx:
        if isinstance(i, (bool, torch.SymBool)) or (isinstance(i, fx.Node) and isinstance(val(i), torch.SymBool)):
            raise CantChunk(f"{n.name}: a boolean index")
        if _is_index_tensor(i) and val(i).dtype not in (torch.int64, torch.int32):
            raise CantChunk(f"{n.name}: an index tensor of dtype {val(i).dtype} (a mask, not positions)")
    if any(_is_index_tensor(i) for i in idx):
        # advanced indexing by one index per dimension: out[j] = x[idx_0[j], idx_1[j], ...]
        if len(idx) != rank_in or not all(isinstance(i, fx.Node) for i in idx):
            raise CantChunk(f"{n.name}: only full advanced indexing is modelled")
        where = {d: ip.index(ip(i).expr, x.shape[d], out_shape, n.name) for d, i in enumerate(idx)}
        return _V(_remap(x.expr, rank_in, rank_out, where))
    if sum(i is Ellipsis for i in idx) > 1:
        raise CantChunk(f"{n.name}: several ellipses")
    consumed = sum(1 for i in idx if i is not None and i is not Ellipsis)
    where, d_in, d_out = {}, 0, 0
    for i in idx:
        if i is Ellipsis:
            for _ in range(rank_in - consumed):
                where[d_in] = IDX[rank_out - 1 - d_out]
                d_in, d_out = d_in + 1, d_out + 1
        elif i is None:
            d_out += 1
        elif isinstance(i, slice):
            # out[j] = x[start + step * j] for j < the recorded length (torch clamps the slice to the size,
            # so every such position is inside it); only the start needs normalizing
            start = sympy.sympify(ip(i.start).expr if i.start is not None else 0)
            step = sympy.sympify(ip(i.step).expr if i.step is not None else 1)
            if step.is_positive is not True or step.is_integer is not True:
                raise CantChunk(f"{n.name}: a slice step that is not a positive integer")
            if not ip.nonneg(start):
                if not (ip.nonneg(-1 - start) and ip.nonneg(start + x.shape[d_in])):
                    raise CantChunk(f"{n.name}: a slice start {start} of unknown sign")
                start = start + x.shape[d_in]
            where[d_in] = start + step * IDX[rank_out - 1 - d_out]
            d_in, d_out = d_in + 1, d_out + 1
        elif isinstance(i, (int, torch.SymInt)) or isinstance(i, fx.Node):
            where[d_in] = ip.index(ip(i).expr, x.shape[d_in], out_shape, n.name)
            d_in += 1
        else:
            raise CantChunk(f"{n.name}: index {i!r} is not modelled")
    while d_in < rank_in:  # trailing dimensions not named by the index
        where[d_in] = IDX[rank_out - 1 - d_out]
        d_in, d_out = d_in + 1, d_out + 1
    return _V(_remap(x.expr, rank_in, rank_out, where))


def _diff(ip: Interp, n):
    """``diff(x, dim, prepend=p)``: a closed form only when every difference is the same expression."""
    _check_kwargs(n, ("n", "dim", "prepend", "append"))
    x = ip(n.args[0])
    rank = len(x.shape)
    if n.kwargs.get("n", 1) != 1 or n.kwargs.get("append") is not None or len(n.args) > 1:
        raise CantChunk(f"{n.name}: only first differences with a prepended value are modelled")
    d = n.kwargs.get("dim", -1)
    k = IDX[rank - 1 - (d + rank if d < 0 else d)]
    inner = sympy.simplify(x.expr - x.expr.subs(k, k - 1))
    p = n.kwargs.get("prepend")
    if p is None:  # out[j] = x[j + 1] - x[j]
        return _V(inner.subs(k, k + 1))
    first = sympy.simplify(x.expr.subs(k, 0) - ip(p).expr)
    if sympy.simplify(inner - first) != 0 or k in inner.free_symbols:
        raise CantChunk(f"{n.name}: the differences are not one closed form")
    return _V(inner)


def _cumsum(ip: Interp, n):
    x = ip(n.args[0])
    if x.expr in (sympy.false, sympy.Integer(0)):
        return _V(0)
    raise CantChunk(f"{n.name}: cumulative sum of a non-zero tensor")


def _band(upper: bool):
    """``tril`` / ``triu`` of a boolean tensor: column - row <= diagonal (tril) or >= diagonal (triu)."""

    def rule(ip: Interp, n):
        _check_kwargs(n, ("diagonal",))
        x = ip(n.args[0])
        diag = n.kwargs.get("diagonal", n.args[1] if len(n.args) > 1 else 0)
        if not x.is_bool or len(x.shape) < 2 or isinstance(diag, bool) or not isinstance(diag, int):
            raise CantChunk(f"{n.name}: tril/triu of a non-boolean tensor or a symbolic diagonal")
        band = sympy.Ge(IDX[0] - IDX[1], diag) if upper else sympy.Le(IDX[0] - IDX[1], diag)
        return _V(sympy.And(x.expr, band))

    return rule


_RULES = {
    "arange": _arange,
    "add": _arith(operator.add), "__add__": _arith(operator.add), "sub": _arith(operator.sub),
    "__sub__": _arith(operator.sub), "mul": _arith(operator.mul), "__mul__": _arith(operator.mul),
    "neg": _neg, "__neg__": _neg,
    "le": _compare(sympy.Le), "lt": _compare(sympy.Lt), "ge": _compare(sympy.Ge), "gt": _compare(sympy.Gt),
    "eq": _compare(sympy.Eq), "ne": _compare(sympy.Ne),
    "and_": _logic(sympy.And), "__and__": _logic(sympy.And), "logical_and": _logic(sympy.And),
    "bitwise_and": _logic(sympy.And), "or_": _logic(sympy.Or), "__or__": _logic(sympy.Or),
    "logical_or": _logic(sympy.Or), "bitwise_or": _logic(sympy.Or),
    "invert": _not, "__invert__": _not, "logical_not": _not, "bitwise_not": _not,
    "to": _same, "expand": _same, "expand_as": _same, "contiguous": _same, "clone": _same,
    "new_ones": _ones, "ones": _ones, "ones_like": _ones,
    "tril": _band(False), "triu": _band(True),
    "getitem": _getitem, "unsqueeze": _unsqueeze, "diff": _diff, "cumsum": _cumsum,
}  # fmt: skip


def is_kv_le_q(p) -> bool:
    """``p`` is exactly ``i0 <= i1`` (key index <= query index) over the integers."""
    k, q = IDX[0], IDX[1]
    lhs = {sympy.Le: lambda r: r.lhs - r.rhs, sympy.Lt: lambda r: r.lhs - r.rhs + 1,
           sympy.Ge: lambda r: r.rhs - r.lhs, sympy.Gt: lambda r: r.rhs - r.lhs + 1}.get(type(p))  # fmt: skip
    return lhs is not None and sympy.expand(lhs(p) - (k - q)) == 0


