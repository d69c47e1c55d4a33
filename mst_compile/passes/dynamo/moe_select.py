"""The selection rules of the token-layout proof: the expert loop that dispatches with ``torch.where(mask)``
(litgpt's ``LLaMAMoE``; NOTE [selected rows]).

NOTE [selected rows]: ``torch.where(mask)`` (or ``nonzero(as_tuple=True)``) of a ``rows(1)`` mask returns the
coordinates of its true entries in row-major order: coordinate 0 is the token row (layout ``sel``), the others
(``selc``, with their position) index the mask's other dimensions. On a chunk of rows ``[a, b)`` it returns
exactly the full call's entries whose token lies in ``[a, b)``, in the same order, token coordinates shifted by
``-a``. So every value indexed by these coordinates is a subset of the full one's rows, each row one token's:

- ``src[sel]`` and ``src[sel, selc_1, ..., None]`` of a ``rows(1)`` tensor: ``rows(1, sort=where)``, one row per
  selected entry (the ``sort`` field names the selection as it names a permutation's sort); projections and
  arithmetic among rows of the same selection keep it;
- ``dst[sel] = v`` / ``dst.index_add_(0, sel, v)`` with ``v`` rows of that selection, into a ``rows(1)`` tensor the
  region made (``zeros_like(x)``, a ``clone``; never a view of the input, which the recompute reads again): a
  write of each selected entry into its own token's row;
- the selection's size (``sym_size``) and Dynamo's range asserts on it stay inside the region.

The layout ``tdim`` (tokens along a dimension other than 0) admits the mask stack of that loop:
``(ids.unsqueeze(-1) == arange(E)).permute(2, 0, 1)`` is ``[E, T, k]``, and ``stack[e]`` is ``rows(1)`` again.
A region with a selection must be traced with ``torch._dynamo.config.capture_dynamic_output_shape_ops = True``
(else Dynamo breaks the graph at ``torch.where``; Inductor needs the same flag for one graph).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ..shared import tval
from .moe_layout import Lay, NotRowwise, arg, is_fn, is_method

COMPARE = {operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge}
FACTORIES = (torch.arange, torch.zeros, torch.ones, torch.full, torch.tensor, torch.eye)


def is_selection(n: fx.Node) -> bool:
    """``torch.where(mask)`` with one argument, or ``nonzero(as_tuple=True)``."""
    if is_fn(n, torch.where) and len(n.args) == 1 and not n.kwargs:
        return True
    if is_fn(n, torch.nonzero) or is_method(n, "nonzero"):
        return arg(n, 1, "as_tuple", False) is True
    return False


def selection_of(lay) -> fx.Node | None:
    """The selection whose entries a layout's rows are (``rows(1, sort=where)``), else ``None``."""
    sort = getattr(lay, "sort", None)
    return sort if sort is not None and is_selection(sort) else None


def is_constant_factory(n: fx.Node, tokens) -> bool:
    """A tensor made in the graph from constants only (``arange(E)``), none of its sizes a multiple of the token
    count: the same on every chunk, so it is read like a weight."""
    if n.op != "call_function" or not any(n.target is f for f in FACTORIES) or n.all_input_nodes:
        return False
    v = tval(n)
    if v is None or not all(isinstance(d, int) for d in v.shape) or not isinstance(tokens, int):
        return False
    return all(d == 0 or d % tokens != 0 for d in v.shape)


class SelectionRules:
    """The rules of :class:`~.moe_admit.Layouts` for ``torch.where`` dispatch (NOTE [selected rows])."""

    def _select(self, n: fx.Node) -> tuple:
        lay = self.rows(n.args[0], n.name)
        if lay.f != 1 or lay.sort is not None:
            raise NotRowwise(f"{n.name}: a selection over rows that are not one per token")
        ndim = tval(n.args[0]).dim()
        return (Lay("sel", 1, n), *(Lay("selc", 1, n, k=i) for i in range(1, ndim)))

    def _permute(self, n: fx.Node) -> Lay:
        lay = self.of(n.args[0])
        order = list(n.args[1:]) if len(n.args) > 2 else arg(n, 1, "dims")
        ndim = tval(n).dim()
        if not isinstance(lay, Lay) or lay.kind not in ("rows", "tdim") or lay.sort is not None or lay.f != 1:
            raise NotRowwise(f"{n.name}: a permute of a value that is not one row per token")
        if not isinstance(order, (list, tuple)) or not all(isinstance(d, int) for d in order):
            raise NotRowwise(f"{n.name}: a permute by dimensions that are not constants")
        d = [x % ndim for x in order].index(lay.k if lay.kind == "tdim" else 0)
        return Lay("rows", 1) if d == 0 else Lay("tdim", 1, k=d)

    def _tdim_getitem(self, n: fx.Node, lay: Lay) -> Lay:
        """``stack[e]``: an integer index along a leading non-token dimension."""
        idx = n.args[1]
        if not isinstance(idx, int):
            raise NotRowwise(f"{n.name}: indexes a value whose tokens are not on dimension 0")
        return Lay("rows", 1) if lay.k == 1 else Lay("tdim", 1, k=lay.k - 1)

    def _gather_selected(self, n: fx.Node, lay: Lay, items: list) -> Lay:
        """``src[sel]`` or ``src[sel, selc_1, ..., None ...]``: the selected entries' rows."""
        first = self.of(items[0]) if isinstance(items[0], fx.Node) else None
        if not (isinstance(first, Lay) and first.kind == "sel"):
            raise NotRowwise(f"{n.name}: tensor indexing of token rows")
        if lay.f != 1 or lay.sort is not None:
            raise NotRowwise(f"{n.name}: selected entries gathered from rows that are not one per token")
        i = 1
        while i < len(items) and isinstance(items[i], fx.Node):
            c = self.of(items[i])
            if not (isinstance(c, Lay) and c.kind == "selc" and c.sort is first.sort and c.k == i):
                raise NotRowwise(f"{n.name}: an index that is not the selection's next coordinate")
            i += 1
        if any(it is not None for it in items[i:]):
            raise NotRowwise(f"{n.name}: a selection gather followed by basic indexing")
        return Lay("rows", 1, first.sort)

    def _write_selected(self, n: fx.Node, dst: fx.Node, idx, value) -> Lay:
        """``dst[sel] = value`` / ``dst.index_add_(0, sel, value)``: each selected entry into its token's row."""
        ld, li = self.of(dst), self.of(idx) if isinstance(idx, fx.Node) else None
        lv = self.of(value) if isinstance(value, fx.Node) else None
        fresh = is_fn(dst, torch.zeros_like, torch.ones_like) or is_method(dst, "clone")  # never a view of the input
        if not (fresh and isinstance(ld, Lay) and ld.kind == "rows" and ld.f == 1 and ld.sort is None):
            raise NotRowwise(f"{n.name}: an indexed write into a value that is not the region's own new rows")
        if not (isinstance(li, Lay) and li.kind == "sel" and isinstance(lv, Lay) and lv.kind == "rows"
                and lv.sort is li.sort):  # fmt: skip
            raise NotRowwise(f"{n.name}: an indexed write whose rows are not the selection's")
        self.writers.setdefault(dst, []).append(n)
        return Lay("effect")

    def _size(self, n: fx.Node) -> Lay:
        """``sym_size(v, 0)`` of a selection's value, and comparisons / asserts of it (Dynamo's range checks)."""
        if is_fn(n, torch.ops.aten.sym_size.int):
            if selection_of(self.of(n.args[0])) is not None and n.args[1] == 0:
                return Lay("size")
            raise NotRowwise(f"{n.name}: the size of a token value")
        if all(not isinstance(self.of(a), Lay) or self.of(a).kind == "size" for a in n.all_input_nodes):
            return Lay("size") if n.target in COMPARE else Lay("effect")
        raise NotRowwise(f"{n.name}: a size compared with a token value")

    def is_token_coordinate(self, a) -> bool:
        """Whether ``a`` is a selection's token coordinate (layout ``sel``)."""
        return isinstance(a, fx.Node) and getattr(self.of(a), "kind", None) == "sel"

    def selection_rule(self, n: fx.Node):
        """The layout by these rules, or ``None`` when none applies."""
        if is_selection(n):
            return self._select(n)
        if is_method(n, "permute") or is_fn(n, torch.permute):
            return self._permute(n)
        if is_fn(n, torch.ops.aten.sym_size.int, torch.ops.aten._assert_scalar.default):
            return self._size(n)
        if n.op == "call_function" and n.target in COMPARE:
            ins = [self.of(a) for a in n.all_input_nodes]
            if any(isinstance(lay, Lay) and lay.kind == "size" for lay in ins):
                return self._size(n)
            return self._elementwise(n)
        if is_fn(n, torch.zeros_like, torch.ones_like) and set(n.kwargs) <= {"dtype", "device"} and len(n.args) == 1:
            lay = self.rows(n.args[0], n.name)
            return Lay("rows", lay.f, lay.sort)
        if is_method(n, "index_add_") and arg(n, 1, "dim") == 0 and len(n.args) == 4 and not n.kwargs:
            return self._write_selected(n, n.args[0], n.args[2], n.args[3])
        return None
