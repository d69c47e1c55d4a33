"""The causal-mask proof: symbolic evaluation of a mask's nodes (``mask_symbols``, ``mask_rules``), every step
checked for exactness.

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

import sympy
import torch
from torch import fx

from ..shared import val
from .context import CantChunk
from .mask_rules import RULES, op_name
from .mask_symbols import SymTensor, affine_bounds, index_box, shape_of, sym_of

# the integers each dtype holds exactly, every one of them: ``[lo, hi]``
_EXACT = {
    torch.uint8: (0, 2**8 - 1), torch.int8: (-(2**7), 2**7 - 1), torch.int16: (-(2**15), 2**15 - 1),
    torch.int32: (-(2**31), 2**31 - 1), torch.int64: (-(2**63), 2**63 - 1),
    torch.float16: (-(2**11), 2**11), torch.bfloat16: (-(2**8), 2**8), torch.float32: (-(2**24), 2**24),
    torch.float64: (-(2**53), 2**53),
}  # fmt: skip


class Interp:
    """Symbolic evaluation of the nodes a mask depends on; anything unknown or inexact raises ``CantChunk``."""

    def __init__(self, sizes: dict | None = None):
        self.env: dict[fx.Node, SymTensor] = {}
        self.sizes = dict(sizes or {})

    def __call__(self, a):
        if isinstance(a, fx.Node):
            if a not in self.env:
                self.env[a] = self._node(a)
            return self.env[a]
        if isinstance(a, (bool, int, torch.SymInt, torch.SymBool)):
            return SymTensor(sym_of(a))
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
        lo, hi = affine_bounds(expr, index_box(shape))
        lo, hi = affine_bounds(lo, self.sizes)[0], affine_bounds(hi, self.sizes)[1]
        if not (lo.is_number and hi.is_number):
            raise CantChunk(f"{expr} depends on {sorted(map(str, (lo + hi).free_symbols))}, which have no bound")
        return lo, hi

    def index(self, e, size, shape, what: str):
        """``e`` as an index into a dimension of ``size``: proven in ``[0, size)``, or in ``[-size, 0)`` (wraps
        exactly to ``e + size``); anything else raises."""
        lo, hi = affine_bounds(e, index_box(shape))
        if self.nonneg(lo) and self.nonneg(size - 1 - hi):
            return e
        if self.nonneg(-1 - hi) and self.nonneg(lo + size):
            return e + size
        raise CantChunk(f"{what}: the index {e} is not proven inside [0, {size}) nor inside [-{size}, 0)")

    def fits(self, x: SymTensor, shape, dtype, what: str) -> None:
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
    def _node(self, n: fx.Node) -> SymTensor:
        v = val(n)
        if isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool):
            e = sym_of(v)  # sizes and integer arithmetic on them: their value is known symbolically
            if e.free_symbols - self.sizes.keys():
                raise CantChunk(f"the mask depends on the runtime value {n.name} = {e}")
            return SymTensor(e)
        if n.op in ("placeholder", "get_attr"):
            raise CantChunk(f"the mask depends on the runtime tensor {n.name}")
        fn = RULES.get(op_name(n))
        if fn is None:
            raise CantChunk(f"the mask uses {n.target}, which the proof does not model")
        out = fn(self, n)
        if isinstance(v, torch.Tensor):
            out = SymTensor(out.expr, shape_of(n))  # re-normalize against the recorded shape
            self.fits(out, out.shape, v.dtype, n.name)
        return out
