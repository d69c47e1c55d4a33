"""Admitting a MoE block's nodes one by one: the layout each node's op gives its value (NOTE [token-wise MoE])."""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx

from ..shared import tval, val
from .moe_layout import (
    CASTS,
    GROUPED_MM_FUNCTIONS,
    GROUPED_MM_OPS,
    INPLACE,
    INPLACE_METHODS,
    REDUCE_FUNCTIONS,
    REDUCE_METHODS,
    Lay,
    NotRowwise,
    arg,
    is_fn,
    is_method,
    not_dim0,
    op_name,
    ratio,
)
from .moe_routing import RoutingRules
from .moe_select import SelectionRules
from .nodes import is_elementwise, linear_args

VIEWS = ("view", "reshape", "unsqueeze", "squeeze", "permute", "contiguous", "flatten", "expand", "type_as", "float",
         "half", "bfloat16", "double")  # may return their input's storage (a cast to the same dtype does)


class Layouts(RoutingRules, SelectionRules):
    """The layouts of one candidate region's nodes, admitted one by one in graph order from ``x``
    (NOTE [token-wise MoE])."""

    def __init__(self, x: fx.Node, param_like):
        self.x = x
        self.tokens = tval(x).shape[0]
        self.lay: dict[fx.Node, object] = {x: Lay("rows", 1)}
        self.param_like = param_like  # node -> bool: a weight (no token rows, independent of x)
        self.extra: list[fx.Node] = []  # nodes pulled into the region by a rule (the inverse permutation's arange)
        self.writers: dict[fx.Node, list[fx.Node]] = {}  # a region value written in place -> the nodes writing it

    # -- helpers -------------------------------------------------------------------------------------------
    def aliases_input(self, n: fx.Node) -> bool:
        """Whether ``n`` may share storage with the region input (a view of it): a write into it would change
        the input, which each chunk's recompute reads again."""
        while n is not self.x:
            basic = n.target is operator.getitem and not isinstance(n.args[1], fx.Node) and not (
                isinstance(n.args[1], tuple) and any(isinstance(i, fx.Node) for i in n.args[1]))  # fmt: skip
            if not (is_method(n, *VIEWS) or is_fn(n, torch.reshape, torch.unsqueeze, torch.squeeze, torch.permute)
                    or basic or is_method(n, "to") and not n.kwargs.get("copy")):  # fmt: skip
                return False
            n = n.args[0]
            if not isinstance(n, fx.Node):
                return False
        return True

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
        by_selection = self.selection_rule(n)
        if by_selection is not None:
            return by_selection
        if n.op == "call_function" and n.target in INPLACE or is_method(n, *INPLACE_METHODS):
            target = n.args[0]
            if target not in self.lay or self.aliases_input(target):
                raise NotRowwise(f"{n.name} writes in place into a value that is not the region's own")
            self.writers.setdefault(target, []).append(n)
            return self._elementwise(n)
        if is_method(n, *CASTS) or is_elementwise(n):
            lay = self._elementwise(n)
            src = self.lay.get(n.args[0]) if n.args else None
            cast = is_method(n, *CASTS, "to")  # ``to`` with a dtype only: is_elementwise checked it
            keep_ids = cast and isinstance(src, Lay) and src.ids and len(token_ins) == 1
            return Lay("rows", lay.f, lay.sort, src.ids) if keep_ids else lay
        if is_method(n, "view", "reshape") or is_fn(n, torch.reshape):
            return self._reshape(n)
        if is_method(n, "unsqueeze", "squeeze") or is_fn(n, torch.unsqueeze, torch.squeeze):
            lay = self.rows(n.args[0], n.name)
            d = arg(n, 1, "dim")
            ndim = tval(n).dim() if n.target in ("unsqueeze", torch.unsqueeze) else tval(n.args[0]).dim()
            not_dim0(n, d, ndim, str(n.target))
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
            not_dim0(n, arg(n, 1, "dim"), tval(n).dim(), "softmax")
            return Lay("rows", lay.f, lay.sort)
        if is_fn(n, torch.topk) or is_method(n, "topk"):
            lay = self.rows(n.args[0], n.name)
            xv = tval(n.args[0])
            d = arg(n, 2, "dim", -1)
            not_dim0(n, d, xv.dim(), "topk")
            width = xv.shape[d]
            base = Lay("rows", lay.f, lay.sort)
            return (base, Lay("rows", lay.f, lay.sort, int(width) if isinstance(width, int) else None))
        if is_fn(n, *REDUCE_FUNCTIONS) or is_method(n, *REDUCE_METHODS):
            lay = self.rows(n.args[0], n.name)
            not_dim0(n, arg(n, 1, "dim"), tval(n.args[0]).dim(), f"{n.target} reduction")
            return Lay("rows", lay.f, lay.sort)
        if is_fn(n, torch.chunk, torch.split) or is_method(n, "chunk", "split"):
            lay = self.rows(n.args[0], n.name)
            not_dim0(n, arg(n, 2, "dim", 0), tval(n.args[0]).dim(), "split")
            return tuple(Lay("rows", lay.f, lay.sort) for _ in val(n))
        if is_fn(n, torch.cat, torch.concat):
            parts = arg(n, 0, "tensors")
            lays = [self.rows(p, n.name) for p in parts]
            not_dim0(n, arg(n, 1, "dim", 0), tval(n).dim(), "cat")
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
            not_dim0(n, arg(n, 1, "dim"), tval(n.args[0]).dim(), "cumsum")
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
