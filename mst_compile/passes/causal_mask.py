"""Pass: an attention mask that is provably the plain causal mask becomes ``is_causal=True``.

NOTE [materialized causal mask]: under tracing, HF models build the 4D boolean mask themselves (their
``_ignore_causal_mask_sdpa`` shortcut is disabled while Dynamo traces), so the compiled graph computes a
``tokens x tokens`` mask, SDPA runs its masked path, and the float form of the mask is saved for backward:
64 MiB at 4K tokens, 1 GiB at 16K (fp32, CPU) - more than the MLP and head intermediates together, and on GPU
it also rules out the FlashAttention kernel. The mask is a pure function of the sequence length, so it can be
decided at compile time which mask it is.

Before::
    q_idx = torch.arange(s)[None, None, :, None]; kv_idx = torch.arange(s)[None, None, None, :]
    mask = new_ones((), bool) & (pos[b, kv_idx] <= pos[b, q_idx]) & (packed[b, q_idx] == packed[b, kv_idx])
    attn = scaled_dot_product_attention(q, k, v, attn_mask=mask.expand(1, -1, s, s), is_causal=False)
After::
    attn = scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=True)

Proof, not pattern: the mask's subgraph is interpreted symbolically with sympy. Every tensor is one
expression of its element index (one integer symbol per dimension, counted from the right, so broadcasting
needs no renaming; a size-1 dimension's symbol is replaced by 0). ``arange`` is its index, indexing substitutes,
comparisons give relations, ``diff`` / ``cumsum`` are evaluated where the result is a closed form. The rewrite
happens only when the mask's expression is exactly ``kv_index <= q_index`` for every batch and head, the query
and key lengths are equal (SDPA's ``is_causal`` is top-left aligned) and the subgraph reads no runtime tensor -
a user's padding mask or position ids, a sliding window, a KV-cache offset all leave the mask alone.
Symbolic sizes (dynamic shapes) are sympy symbols too, so the proof holds for every length.
"""

from __future__ import annotations

import math
import operator

import sympy
import torch
import torch.nn.functional as F
from torch import fx

from .. import _compat
from ..report import Region
from .common import CantChunk, PassContext, skip, val

_IDX = [sympy.Symbol(f"i{k}", integer=True, nonnegative=True) for k in range(8)]  # i0 = last dimension
_TMP = [sympy.Symbol(f"t{k}", integer=True, nonnegative=True) for k in range(8)]
_SDPA = {torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention}
_HOP_CHECKPOINT = "tag_activation_checkpoint"


class _V:
    """A tensor (or scalar) as one sympy expression of its index; ``shape`` holds sympy sizes."""

    __slots__ = ("expr", "shape")

    def __init__(self, expr, shape=()):
        self.expr = sympy.sympify(expr)
        self.shape = tuple(shape)
        for k, size in enumerate(reversed(self.shape)):  # a size-1 dimension has index 0
            if size == 1:
                self.expr = self.expr.subs(_IDX[k], 0)

    @property
    def is_bool(self) -> bool:
        # not ``Boolean``: sympy's Symbol subclasses it
        return isinstance(self.expr, (sympy.core.relational.Relational, sympy.logic.boolalg.BooleanAtom,
                                      sympy.logic.boolalg.BooleanFunction))  # fmt: skip


def _sym(x):
    return sympy.sympify(_compat.sym_expr(x))


def _shape(n) -> tuple:
    v = val(n)
    if not isinstance(v, torch.Tensor):
        raise CantChunk(f"{n} has no tensor metadata")
    return tuple(_sym(s) for s in v.shape)


def _remap(expr, old_rank: int, new_rank: int, where: dict):
    """Rename index symbols: old dimension ``d`` (from the left) becomes the expression ``where[d]``, written in
    the new tensor's index symbols; all substitutions at once (old and new symbols share names)."""
    subs = {_IDX[old_rank - 1 - d]: e for d, e in where.items()}
    tmp = {_IDX[k]: _TMP[k] for k in range(new_rank)}
    subs = {s: sympy.sympify(e).xreplace(tmp) for s, e in subs.items()}
    back = {_TMP[k]: _IDX[k] for k in range(new_rank)}
    return expr.xreplace(subs).xreplace(back)


class _Interp:
    """Symbolic evaluation of the nodes a mask depends on; anything unknown raises ``CantChunk``."""

    def __init__(self):
        self.env: dict[fx.Node, _V] = {}

    def __call__(self, a):
        if isinstance(a, fx.Node):
            if a not in self.env:
                self.env[a] = self._node(a)
            return self.env[a]
        if isinstance(a, (bool, int, torch.SymInt, torch.SymBool)):
            return _V(_sym(a))
        raise CantChunk(f"unsupported constant {a!r} in the mask")

    def _node(self, n: fx.Node) -> _V:
        v = val(n)
        if isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool):
            return _V(_sym(v))  # sizes and integer arithmetic on them: their value is known symbolically
        if n.op in ("placeholder", "get_attr"):
            raise CantChunk(f"the mask depends on the runtime tensor {n.name}")
        name = n.target if n.op == "call_method" else getattr(n.target, "__name__", str(n.target))
        fn = _RULES.get(name)
        if fn is None:
            raise CantChunk(f"the mask uses {name}, which the proof does not model")
        out = fn(self, n)
        if isinstance(v, torch.Tensor):
            out = _V(out.expr, _shape(n))  # re-normalize against the recorded shape
        return out


def _arange(ip: _Interp, n):
    a = [ip(x).expr for x in n.args]
    start, end, step = (0, a[0], 1) if len(a) == 1 else (a[0], a[1], a[2] if len(a) > 2 else 1)
    return _V(start + step * _IDX[0])


def _arith(op):
    def rule(ip: _Interp, n):
        x, y = (ip(a) for a in n.args[:2])
        if x.is_bool or y.is_bool or n.kwargs.get("alpha", 1) != 1:
            raise CantChunk(f"arithmetic on booleans / scaled arithmetic in {n.name}")
        return _V(op(x.expr, y.expr))

    return rule


def _compare(rel):
    return lambda ip, n: _V(rel(ip(n.args[0]).expr, ip(n.args[1]).expr))


def _logic(op):
    def rule(ip: _Interp, n):
        xs = [ip(a) for a in n.args[:2]]
        if not all(x.is_bool for x in xs):
            raise CantChunk(f"bitwise logic on integers in {n.name}")
        return _V(op(*(x.expr for x in xs)))

    return rule


def _not(ip: _Interp, n):
    x = ip(n.args[0])
    if not x.is_bool:
        raise CantChunk(f"bitwise not of integers in {n.name}")
    return _V(sympy.Not(x.expr))


def _same(ip: _Interp, n):
    """Ops that keep every element's value: device moves, expand, a same-dtype ``to``."""
    src = n.args[0]
    if n.target == "to" and isinstance(val(src), torch.Tensor) and val(src).dtype != val(n).dtype:
        raise CantChunk(f"{n.name} changes the dtype")
    return ip(src)


def _ones(ip: _Interp, n):
    v = val(n)
    return _V(sympy.true if v.dtype == torch.bool else 1)


def _insert_dims(x: _V, rank_in: int, new_dims: list[int], rank_out: int) -> sympy.Basic:
    """``x`` with size-1 dimensions inserted at output positions ``new_dims`` (from the left)."""
    old = [d for d in range(rank_out) if d not in new_dims]
    return _remap(x.expr, rank_in, rank_out, {d: _IDX[rank_out - 1 - o] for d, o in enumerate(old)})


def _unsqueeze(ip: _Interp, n):
    x = ip(n.args[0])
    rank = len(x.shape)
    d = n.args[1] if len(n.args) > 1 else n.kwargs["dim"]
    d = d + rank + 1 if d < 0 else d
    return _V(_insert_dims(x, rank, [d], rank + 1))


def _getitem(ip: _Interp, n):
    src, idx = n.args
    if not isinstance(val(src), torch.Tensor):
        raise CantChunk(f"{n.name} indexes a non-tensor")
    x = ip(src)
    rank_in, rank_out = len(x.shape), len(_shape(n))
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, fx.Node) and isinstance(val(i), torch.Tensor) for i in idx):
        # advanced indexing by one index tensor per dimension: out[j] = x[idx_0[j], idx_1[j], ...]
        if len(idx) != rank_in or not all(isinstance(i, fx.Node) for i in idx):
            raise CantChunk(f"{n.name}: only full advanced indexing is modelled")
        return _V(_remap(x.expr, rank_in, rank_out, {d: ip(i).expr for d, i in enumerate(idx)}))
    if sum(i is Ellipsis for i in idx) > 1:
        raise CantChunk(f"{n.name}: several ellipses")
    consumed = sum(1 for i in idx if i is not None and i is not Ellipsis)
    where, d_in, d_out = {}, 0, 0
    for i in idx:
        if i is Ellipsis:
            for _ in range(rank_in - consumed):
                where[d_in] = _IDX[rank_out - 1 - d_out]
                d_in, d_out = d_in + 1, d_out + 1
        elif i is None:
            d_out += 1
        elif isinstance(i, slice):
            start = sympy.sympify(ip(i.start).expr if i.start is not None else 0)
            step = sympy.sympify(ip(i.step).expr if i.step is not None else 1)
            if start.is_negative is not False or step.is_positive is not True:
                raise CantChunk(f"{n.name}: a slice with a possibly negative start or step")
            where[d_in] = start + step * _IDX[rank_out - 1 - d_out]
            d_in, d_out = d_in + 1, d_out + 1
        elif isinstance(i, (int, torch.SymInt)) or isinstance(i, fx.Node):
            k = ip(i).expr
            if k.is_negative:
                k = k + x.shape[d_in]
            where[d_in] = k
            d_in += 1
        else:
            raise CantChunk(f"{n.name}: index {i!r} is not modelled")
    while d_in < rank_in:  # trailing dimensions not named by the index
        where[d_in] = _IDX[rank_out - 1 - d_out]
        d_in, d_out = d_in + 1, d_out + 1
    return _V(_remap(x.expr, rank_in, rank_out, where))


def _diff(ip: _Interp, n):
    """``diff(x, dim, prepend=p)``: a closed form only when every difference is the same expression."""
    x = ip(n.args[0])
    rank = len(x.shape)
    if n.kwargs.get("n", 1) != 1 or n.kwargs.get("append") is not None or len(n.args) > 1:
        raise CantChunk(f"{n.name}: only first differences with a prepended value are modelled")
    d = n.kwargs.get("dim", -1)
    k = _IDX[rank - 1 - (d + rank if d < 0 else d)]
    inner = sympy.simplify(x.expr - x.expr.subs(k, k - 1))
    p = n.kwargs.get("prepend")
    if p is None:  # out[j] = x[j + 1] - x[j]
        return _V(inner.subs(k, k + 1))
    first = sympy.simplify(x.expr.subs(k, 0) - ip(p).expr)
    if sympy.simplify(inner - first) != 0 or k in inner.free_symbols:
        raise CantChunk(f"{n.name}: the differences are not one closed form")
    return _V(inner)


def _cumsum(ip: _Interp, n):
    x = ip(n.args[0])
    if x.expr in (sympy.false, sympy.Integer(0)):
        return _V(0)
    raise CantChunk(f"{n.name}: cumulative sum of a non-zero tensor")


def _band(upper: bool):
    """``tril`` / ``triu`` of a boolean tensor: column - row <= diagonal (tril) or >= diagonal (triu)."""

    def rule(ip: _Interp, n):
        x = ip(n.args[0])
        diag = n.kwargs.get("diagonal", n.args[1] if len(n.args) > 1 else 0)
        if not x.is_bool or len(x.shape) < 2 or not isinstance(diag, int):
            raise CantChunk(f"{n.name}: tril/triu of a non-boolean tensor or a symbolic diagonal")
        band = sympy.Ge(_IDX[0] - _IDX[1], diag) if upper else sympy.Le(_IDX[0] - _IDX[1], diag)
        return _V(sympy.And(x.expr, band))

    return rule


_RULES = {
    "arange": _arange,
    "add": _arith(operator.add), "__add__": _arith(operator.add), "sub": _arith(operator.sub),
    "__sub__": _arith(operator.sub), "mul": _arith(operator.mul), "__mul__": _arith(operator.mul),
    "neg": lambda ip, n: _V(-ip(n.args[0]).expr),
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


def _is_kv_le_q(p) -> bool:
    """``p`` is exactly ``i0 <= i1`` (key index <= query index) over the integers."""
    k, q = _IDX[0], _IDX[1]
    lhs = {sympy.Le: lambda r: r.lhs - r.rhs, sympy.Lt: lambda r: r.lhs - r.rhs + 1,
           sympy.Ge: lambda r: r.rhs - r.lhs, sympy.Gt: lambda r: r.rhs - r.lhs + 1}.get(type(p))  # fmt: skip
    return lhs is not None and sympy.expand(lhs(p) - (k - q)) == 0


def _sdpa_mask(n: fx.Node):
    if n.op != "call_function" or n.target not in _SDPA:
        return None
    mask = n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None)
    causal = n.kwargs.get("is_causal", n.args[5] if len(n.args) > 5 else False)
    return mask if isinstance(mask, fx.Node) and causal is False else None


def prove_causal(mask: fx.Node, q: fx.Node, k: fx.Node, ip: _Interp | None = None) -> None:
    """Raise ``CantChunk`` unless ``mask`` is the causal mask of SDPA(q, k, ...) for every shape."""
    mv, qv, kv = val(mask), val(q), val(k)
    if not all(isinstance(t, torch.Tensor) for t in (mv, qv, kv)) or mv.dtype != torch.bool:
        raise CantChunk("the mask is not a boolean tensor")
    lq, lk = _sym(qv.shape[-2]), _sym(kv.shape[-2])
    ms = _shape(mask)
    if len(ms) < 2 or sympy.simplify(lq - lk) != 0 or sympy.simplify(ms[-2] - lq) != 0 or (
        sympy.simplify(ms[-1] - lk) != 0
    ):
        raise CantChunk(f"query length {lq} and key length {lk} differ from each other or from the mask's")
    p = (ip or _Interp())(mask).expr
    if p.free_symbols - {_IDX[0], _IDX[1]} or not _is_kv_le_q(p):
        raise CantChunk(f"the mask is {p}, not the causal mask i0 <= i1")


def _set_causal(n: fx.Node) -> None:
    args = list(n.args)
    if len(args) > 3:
        args[3] = None
    if len(args) > 5:
        args[5] = True
    kwargs = dict(n.kwargs)
    if "attn_mask" in kwargs or len(n.args) <= 3:
        kwargs["attn_mask"] = None
    if len(args) <= 5:
        kwargs["is_causal"] = True
    n.args, n.kwargs = tuple(args), kwargs


def _checkpoint_body(gm: fx.GraphModule, u: fx.Node):
    """``(body, placeholders)`` when ``u`` calls a checkpointed layer (its operands are ``u.args[1:]``)."""
    if u.op != "call_function" or getattr(u.target, "__name__", "") != _HOP_CHECKPOINT:
        return None
    body = getattr(gm, u.args[0].target, None) if isinstance(u.args[0], fx.Node) else None
    if not isinstance(body, fx.GraphModule):
        return None
    return body, [p for p in body.graph.nodes if p.op == "placeholder"]


def _uses(gm: fx.GraphModule, mask: fx.Node):
    """``(graph, sdpa node)`` for every SDPA reading ``mask``, directly or inside a checkpointed layer."""
    for u in list(mask.users):
        if _sdpa_mask(u) is mask:
            yield gm, u
        elif (hop := _checkpoint_body(gm, u)) is not None:
            body, ph = hop
            for pos, a in enumerate(u.args[1:]):
                if a is mask and pos < len(ph):
                    yield from ((body, s) for s in list(ph[pos].users) if _sdpa_mask(s) is ph[pos])


def _erase_dead(graph: fx.Graph, nodes) -> None:
    """Erase ``nodes`` and then their inputs, as long as nothing else reads them (the mask's subgraph)."""
    todo, erased = list(nodes), set()
    while todo:
        n = todo.pop()
        if n not in erased and n.graph is graph and not n.users and n.op not in ("placeholder", "output"):
            todo += n.all_input_nodes
            graph.erase_node(n)
            erased.add(n)


def _drop_operand(gm: fx.GraphModule, mask: fx.Node) -> None:
    """A checkpointed layer whose body no longer reads the mask stops taking it as an operand."""
    for u in list(mask.users):
        hop = _checkpoint_body(gm, u)
        if hop is None:
            continue
        body, ph = hop
        keep = [pos for pos, a in enumerate(u.args[1:]) if not (a is mask and not ph[pos].users)]
        if len(keep) == len(ph):
            continue
        for pos, p in enumerate(ph):
            if pos not in keep:
                body.graph.erase_node(p)
        u.args = (u.args[0], *(u.args[1 + pos] for pos in keep))
        body.recompile()


def rewrite(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Prove each distinct SDPA mask causal, then drop it from every attention call that reads it."""
    if not ctx.config.causal_mask:
        return
    ip = _Interp()
    candidates = [(n, uses) for n in gm.graph.nodes if (uses := list(_uses(gm, n)))]
    for mask, uses in candidates:
        rec = Region("mask", mask.name, "skipped")
        try:
            for _, s in uses:
                prove_causal(mask, s.args[0], s.args[1], ip)
        except Exception as e:  # noqa: BLE001 - CantChunk, or a bug: either way the mask stays
            skip(rec, e)
            ctx.regions.append(rec)
            continue
        for _, s in uses:
            _set_causal(s)
        shape = list(val(mask).shape)
        _drop_operand(gm, mask)
        _erase_dead(gm.graph, [mask])
        rec.status = "rewritten"
        rec.shapes = f"mask={shape} -> is_causal, {len(uses)} attention calls"
        rec.bytes_saved = _compat.size_hint(math.prod(shape)) * 4  # the float form SDPA saves for backward
        ctx.regions.append(rec)
