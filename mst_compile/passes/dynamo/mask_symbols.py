"""The symbolic model behind the causal-mask pass: a tensor as one sympy expression of its index.

Every tensor is one expression of its element index (one integer symbol per dimension, counted from the right,
so broadcasting needs no renaming; a size-1 dimension's symbol is replaced by 0). ``arange`` is its index,
indexing substitutes, comparisons give relations, ``diff`` / ``cumsum`` are evaluated where the result is a
closed form; anything else raises ``CantChunk``. Symbolic sizes (dynamic shapes) are sympy symbols too, so a
proof holds for every length; every step of a proof is checked for exactness (NOTE [causal-mask proof]).
"""

from __future__ import annotations

import sympy
import torch
from torch import fx

from ... import _compat
from ..shared import val
from .context import CantChunk

IDX = [sympy.Symbol(f"i{k}", integer=True, nonnegative=True) for k in range(8)]  # i0 = last dimension
_TMP = [sympy.Symbol(f"t{k}", integer=True, nonnegative=True) for k in range(8)]
SIZE_MAX = 2**48  # the longest dimension a size symbol can stand for (NOTE [causal-mask proof])


class SymTensor:
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


def remap(expr, old_rank: int, new_rank: int, where: dict):
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


def index_box(shape) -> dict:
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


def is_kv_le_q(p) -> bool:
    """``p`` is exactly ``i0 <= i1`` (key index <= query index) over the integers."""
    k, q = IDX[0], IDX[1]
    lhs = {sympy.Le: lambda r: r.lhs - r.rhs, sympy.Lt: lambda r: r.lhs - r.rhs + 1,
           sympy.Ge: lambda r: r.rhs - r.lhs, sympy.Gt: lambda r: r.rhs - r.lhs + 1}.get(type(p))  # fmt: skip
    return lhs is not None and sympy.expand(lhs(p) - (k - q)) == 0
