"""The per-op rules of the causal-mask proof: what each modelled ``torch`` / ``operator`` / ``Tensor`` call
computes, as an expression of its index (NOTE [causal-mask proof]); anything else is not modelled."""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import sympy
import torch
from torch import fx

from ..shared import val
from .context import CantChunk
from .mask_symbols import IDX, SymTensor, remap, shape_of

if TYPE_CHECKING:
    from .mask_proof import Interp


def op_name(n: fx.Node) -> str | None:
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
    return SymTensor(start + step * IDX[0])


def _arith(op):
    def rule(ip: Interp, n):
        _check_kwargs(n, ("alpha",), nargs=2)
        args = n.args
        x, y = (ip(a) for a in args)
        if x.is_bool or y.is_bool or n.kwargs.get("alpha", 1) != 1:
            raise CantChunk(f"arithmetic on booleans / scaled arithmetic in {n.name}")
        if isinstance(val(n), torch.Tensor):
            _operands_fit(ip, n, args, (x, y), val(n).dtype)
        return SymTensor(op(x.expr, y.expr))

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
        return SymTensor(rel(xs[0].expr, xs[1].expr))

    return rule


def _logic(op):
    def rule(ip: Interp, n):
        _check_kwargs(n, nargs=2)
        xs = [ip(a) for a in n.args]
        if not all(x.is_bool for x in xs):
            raise CantChunk(f"bitwise logic on integers in {n.name}")
        return SymTensor(op(*(x.expr for x in xs)))

    return rule


def _not(ip: Interp, n):
    _check_kwargs(n, nargs=1)
    x = ip(n.args[0])
    if not x.is_bool:
        raise CantChunk(f"bitwise not of integers in {n.name}")
    return SymTensor(sympy.Not(x.expr))


def _neg(ip: Interp, n):
    _check_kwargs(n, nargs=1)
    x = ip(n.args[0])
    if x.is_bool:
        raise CantChunk(f"{n.name} negates a boolean")
    return SymTensor(-x.expr)


def _same(ip: Interp, n):
    """Ops that keep every element's value: device moves, expand, a same-dtype ``to``."""
    src = n.args[0]
    if not isinstance(val(src), torch.Tensor) or val(src).dtype != val(n).dtype:
        raise CantChunk(f"{n.name} changes the dtype")
    return ip(src)


def _ones(ip: Interp, n):
    v = val(n)
    return SymTensor(sympy.true if v.dtype == torch.bool else 1)


def _insert_dims(x: SymTensor, rank_in: int, new_dims: list[int], rank_out: int) -> sympy.Basic:
    """``x`` with size-1 dimensions inserted at output positions ``new_dims`` (from the left)."""
    old = [d for d in range(rank_out) if d not in new_dims]
    return remap(x.expr, rank_in, rank_out, {d: IDX[rank_out - 1 - o] for d, o in enumerate(old)})


def _unsqueeze(ip: Interp, n):
    x = ip(n.args[0])
    rank = len(x.shape)
    d = n.args[1] if len(n.args) > 1 else n.kwargs["dim"]
    d = d + rank + 1 if d < 0 else d
    return SymTensor(_insert_dims(x, rank, [d], rank + 1))


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
        return SymTensor(remap(x.expr, rank_in, rank_out, where))
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
    return SymTensor(remap(x.expr, rank_in, rank_out, where))


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
        return SymTensor(inner.subs(k, k + 1))
    first = sympy.simplify(x.expr.subs(k, 0) - ip(p).expr)
    if sympy.simplify(inner - first) != 0 or k in inner.free_symbols:
        raise CantChunk(f"{n.name}: the differences are not one closed form")
    return SymTensor(inner)


def _cumsum(ip: Interp, n):
    x = ip(n.args[0])
    if x.expr in (sympy.false, sympy.Integer(0)):
        return SymTensor(0)
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
        return SymTensor(sympy.And(x.expr, band))

    return rule


RULES = {
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
