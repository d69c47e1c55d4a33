"""Pass: an attention mask that is provably the plain causal mask becomes ``is_causal=True``.

NOTE [materialized causal mask]: under tracing, HF models build the 4D boolean mask themselves (their
``_ignore_causal_mask_sdpa`` shortcut is disabled while Dynamo traces), so the compiled graph computes a
``tokens x tokens`` mask, SDPA runs its masked path, and the float form of the mask is saved for backward
(1 GiB at 16K tokens, fp32: more than the MLP and head intermediates together); on GPU it also rules out the
FlashAttention kernel. The mask is a pure function of the sequence length, so it can be decided at compile time
which mask it is.

Before::
    q_idx = torch.arange(s)[None, None, :, None]; kv_idx = torch.arange(s)[None, None, None, :]
    mask = new_ones((), bool) & (pos[b, kv_idx] <= pos[b, q_idx]) & (packed[b, q_idx] == packed[b, kv_idx])
    attn = scaled_dot_product_attention(q, k, v, attn_mask=mask.expand(1, -1, s, s), is_causal=False)
After::
    attn = scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=True)

Proof, not pattern: ``mask_proof`` interprets the mask's subgraph symbolically (NOTE [causal-mask proof]); the
rewrite happens only when the mask is exactly ``kv_index <= q_index`` for every batch, head and length, the
query and key lengths are equal (SDPA's ``is_causal`` is top-left aligned) and the subgraph reads no runtime
tensor - a user's padding mask or position ids, a sliding window, a KV-cache offset all leave the mask alone.
Belt and braces (``mask_eval``): the subgraph is also run at small concrete lengths and compared with ``tril``;
any disagreement leaves the mask alone.
"""

from __future__ import annotations

import math

import sympy
import torch
from torch import fx

from ... import _compat
from ...report import Region
from . import mask_eval
from ..shared import val
from .context import CantChunk, PassContext, skip
from .mask_proof import Interp
from .mask_symbols import IDX, is_kv_le_q, shape_of, size_symbols, sym_of

_SDPA = _compat.SDPA_FUNCTIONS
_HOP_CHECKPOINT = "tag_activation_checkpoint"


def _sdpa_mask(n: fx.Node):
    if n.op != "call_function" or n.target not in _SDPA:
        return None
    mask = n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None)
    causal = n.kwargs.get("is_causal", n.args[5] if len(n.args) > 5 else False)
    return mask if isinstance(mask, fx.Node) and causal is False else None


def prove_causal(mask: fx.Node, q: fx.Node, k: fx.Node, ip: Interp | None = None) -> None:
    """Raise ``CantChunk`` unless ``mask`` is the causal mask of SDPA(q, k, ...) for every shape."""
    mv, qv, kv = val(mask), val(q), val(k)
    if not all(isinstance(t, torch.Tensor) for t in (mv, qv, kv)) or mv.dtype != torch.bool:
        raise CantChunk("the mask is not a boolean tensor")
    lq, lk = sym_of(qv.shape[-2]), sym_of(kv.shape[-2])
    ms = shape_of(mask)
    if len(ms) < 2 or sympy.simplify(lq - lk) != 0 or sympy.simplify(ms[-2] - lq) != 0 or (
        sympy.simplify(ms[-1] - lk) != 0
    ):
        raise CantChunk(f"query length {lq} and key length {lk} differ from each other or from the mask's")
    p = (ip or Interp(size_symbols(mask.graph)))(mask).expr
    if p.free_symbols - {IDX[0], IDX[1]} or not is_kv_le_q(p):
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
    ip = Interp(size_symbols(gm.graph))
    candidates = [(n, uses) for n in gm.graph.nodes if (uses := list(_uses(gm, n)))]
    for mask, uses in candidates:
        rec = Region("mask", mask.name, "skipped")
        try:
            for _, s in uses:
                prove_causal(mask, s.args[0], s.args[1], ip)
            mask_eval.check_tril(mask, sym_of(val(uses[0][1].args[0]).shape[-2]), ip.sizes)
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
