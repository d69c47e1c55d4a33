"""The indexing rules of the token-layout proof: gathers, and the routing indices of HF's grouped-experts form
(the sort's permutation, its inverse, the expert histogram and offsets; NOTE [token-wise MoE])."""

from __future__ import annotations

import torch
from torch import fx

from ..shared import tval, val
from .moe_layout import Lay, NotRowwise, arg, is_fn, ratio


class RoutingRules:
    """The rules of :class:`~.moe_admit.Layouts` that index rows or build the routing (``self.of``, ``self.rows``,
    ``self.lay``, ``self.extra`` are the layouts')."""

    def _getitem(self, n: fx.Node):
        src, idx = n.args[0], n.args[1]
        lay = self.of(src)
        if isinstance(lay, tuple):  # an element of topk / sort / chunk / a selection
            return lay[idx]
        if isinstance(lay, Lay) and lay.kind == "tdim":
            return self._tdim_getitem(n, lay)
        il = self.of(idx) if isinstance(idx, fx.Node) else None
        if lay is None and isinstance(il, Lay) and il.kind == "rows" and tval(idx).dim() == 1:
            if tval(idx).dtype not in (torch.int64, torch.int32):
                raise NotRowwise(f"{n.name}: a weight indexed by a non-integer tensor")
            return Lay("rows", il.f, il.sort)  # W[expert_ids]: one weight slice per row
        if not isinstance(lay, Lay) or lay.kind != "rows":
            raise NotRowwise(f"{n.name}: indexes a routing value")
        items = list(idx) if isinstance(idx, tuple) else [idx]
        if items and self.is_token_coordinate(items[0]):
            return self._gather_selected(n, lay, items)
        if isinstance(il, Lay):
            if il.kind == "perm" and lay.sort is None and lay.f == il.f:
                return Lay("rows", il.f, il.sort, lay.ids)
            if il.kind == "permtok" and lay.sort is None and lay.f * il.k == il.f:
                return Lay("rows", il.f, il.sort, lay.ids)
            if il.kind == "inv" and lay.sort is il.sort and lay.f == il.f:
                return Lay("rows", il.f, None, lay.ids)
            raise NotRowwise(f"{n.name}: rows gathered by an index that is not a proven per-token permutation")
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
        if self.is_token_coordinate(idx):
            return self._write_selected(n, inv, idx, value)
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
        extra = {k: v for k, v in n.kwargs.items() if k != "offs"}  # Dynamo spells out bias=None, out_dtype=None
        if tval(w).shape[0] != lo.ids or set(extra) - {"bias", "out_dtype"} or any(v is not None for v in extra.values()) \
                or len(n.args) > 3:  # fmt: skip
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
