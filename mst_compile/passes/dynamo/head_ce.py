"""Pass: fuse the vocabulary projection with its cross-entropy and run both one mini-sequence at a time.

Finds ``cross_entropy(T(linear(h, W, b)), labels)``, ``T`` row-wise math and token-layout ops (``head_match.py``).
The layout ops are replayed on ``h`` instead (they commute with row-wise math), so the op sees ``[tokens, H]``.

Before::

    logits = linear(h, W); f = logits.float(); loss = cross_entropy(f.view(-1, V), y, ignore_index=-100)
    return loss, logits            # HF: the logits are a graph output too

After::

    out = mst.linear_ce(h.reshape(-1, H), W, None, y.reshape(-1), "<head spec>")   # logits written chunk by chunk,
    loss, logits = out[0], out[5].view(*h.shape[:-1], V)    # in the model dtype, only if they are returned
    return loss, logits

NOTE [returned logits]: ``torch.compile(model)`` on an HF model returns the logits next to the loss. An output
that requires grad gets a zero-filled gradient of its full size in backward when it is unused, so the op
returns the logits *without* autograd history and the backend's runner re-attaches it outside the compiled
graph with an autograd.Function whose backward runs only if the user really differentiates the logits
(chunked recompute; see ``logits.py``). ``logits="skip"`` returns an object that raises on use instead.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import fx

from ...ops import registry
from ...ops.spec import HeadSpec, RowwiseSpec
from ...ops.accumulate import accumulator_bytes
from ...ops.linear_ce import chunk_logit_bytes, whole_logit_bytes
from ...plan import chunk_plan
from ...report import Region
from ..shared import tval
from .build import emit, from_rows, size_args, to_rows
from .context import CantChunk, PassContext, skip
from .head_match import HeadMatch, check_tail_inputs, find_head, layout_kind, view_shape
from .modes import autocast_states, region_autocast, region_grad
from .nodes import bind_cross_entropy, linear_args, numel_bytes


def head_nodes(g: fx.Graph, h: fx.Node, w: fx.Node, b, labels: fx.Node, spec: HeadSpec, h_orig: fx.Node, vocab: int):
    """What the rewritten graph runs (NOTE [cacheable graph]): ``(loss, logits [*h_orig.shape[:-1], V] or an empty
    tensor)`` from ``mst::linear_ce`` on ``h``'s rows. ``h`` has had the token-layout ops between the projection
    and the loss replayed on it; ``h_orig`` is the projection's input, whose leading dims the logits take."""
    h2 = to_rows(g, h, int(tval(w).shape[1]))
    y = emit(g, "call_method", "reshape", (labels, -1)) if tval(labels).dim() != 1 else labels
    y = emit(g, "call_method", "to", (y, torch.int64)) if tval(y).dtype != torch.int64 else y
    call = emit(g, "call_function", torch.ops.mst.linear_ce.default, (h2, w, b, y, spec.dumps()))  # NOTE [body spec]
    loss = emit(g, "call_function", operator.getitem, (call, 0))
    logits = emit(g, "call_function", operator.getitem, (call, 5))
    return loss, (from_rows(g, logits, h_orig, vocab) if spec.want_logits else logits)


@dataclass
class LogitsOutput:
    """A graph output that is the head's logits: which output slots, and how the runner rebuilds them."""

    slots: list[int]
    mode: str  # "bridge" (re-attach autograd) | "skip" (raise on use) | "plain" (no grad needed)
    extra: list[int]  # indices (in the compiled graph's outputs) of h, w[, b]
    # a RowwiseSpec string: the logits as a row-wise body in the head's chunks, for the rebuild's backward; its
    # body gives their width and dtype (NOTE [body spec])
    spec: str


def _tail_bytes(chain: list[fx.Node], pre, post, logits_dtype: torch.dtype) -> int:
    """Bytes per vocabulary entry of one chunk's temporaries. NOTE [tail temporaries]: the fused path keeps one
    fp32 copy of the chunk's logits, and for low-precision logits their gradient in that dtype beside it (the
    compiled cross-entropy writes only the gradient next to the logits); a row-wise tail (softcap, scaling) runs
    op by op through autograd, which keeps each op's output and makes its gradient, next to the fp32 log-softmax
    and its gradient. The chunk plan bounds those bytes (Gemma-2 bf16, 2048 tokens, logits returned: 512-token
    chunks made the step's peak 608 MiB against Inductor's 567)."""
    if pre.cast_only and post.cast_only:
        return chunk_logit_bytes(torch.empty((), dtype=logits_dtype).element_size(), post.compiled)
    return 8 + 2 * sum(tval(n).element_size() for n in chain if layout_kind(n) is None and tval(n) is not None)


def _whole_bytes(pre, post, vocab: int, elt: int) -> int | None:
    """What Inductor holds per token of a whole head (NOTE [chunking pays]): the logits and their gradient, for a
    head with no tail; None (chunking always pays) for a tail, whose whole form Inductor fuses in ways this count
    does not follow (Gemma-2, bf16, 2048 tokens: 256-token chunks 468 MiB against the whole head's 567)."""
    return vocab * whole_logit_bytes(elt) if pre.cast_only and post.cast_only else None


def _row_positions(g: fx.Graph, h: fx.Node) -> tuple:
    """``([*h.shape[:-1], 1]``: each row's flat index, to replay the loss's row selection on; the row count)."""
    hv = tval(h)
    lead = size_args(g, h, range(hv.dim() - 1))
    rows = math.prod(lead) if all(isinstance(d, int) for d in lead) else emit(
        g, "call_function", operator.floordiv, (emit(g, "call_method", "numel", (h,)), int(hv.shape[-1])))  # fmt: skip
    pos = emit(g, "call_function", torch.arange, (rows,), {"device": hv.device}, like=h)
    return emit(g, "call_method", "view", (pos, *lead, 1)), rows


def _labels_for_all_rows(g: fx.Graph, pos: fx.Node, rows, labels: fx.Node, ignore_index: int) -> fx.Node:
    """Labels for every row: the loss's label where the loss reads the row, ``ignore_index`` elsewhere."""
    lv = tval(labels)
    full = emit(g, "call_function", torch.full, ((rows,), ignore_index), {"dtype": lv.dtype, "device": lv.device},
                like=labels)  # fmt: skip
    flat_pos = emit(g, "call_method", "reshape", (pos, -1))
    return emit(g, "call_method", "index_put", (full, (flat_pos,), emit(g, "call_method", "reshape", (labels, -1))))


def _replay_layout(gm: fx.GraphModule, m: HeadMatch, h: fx.Node, hidden: int, vocab: int) -> fx.Node:
    cur = h
    for n in m.chain:
        kind = layout_kind(n)
        if kind is None or kind == "contiguous":
            continue
        if kind == "view":
            shape = view_shape(n)
            if shape[-1] == vocab:
                shape[-1] = hidden
            # the replay skips ``contiguous``, so ``h`` may be a strided slice here: reshape, never view
            new = emit(gm.graph, "call_method", "reshape", (cur, *shape))
        else:
            new = emit(gm.graph, n.op, n.target, (cur, *n.args[1:]), dict(n.kwargs))
        new.meta.update({k: v for k, v in n.meta.items() if k not in ("example_value", "val")})
        cur = new
    return cur


def _body(nodes: list[fx.Node], kind: str, dtype: torch.dtype, amp, out_dtype: torch.dtype | None = None,
          compiled: bool = False) -> str:  # fmt: skip
    """Register the elementwise ops among ``nodes`` (layout ops dropped) as a one-input body; ``out_dtype``,
    when given, is the dtype the body's result is converted to last (NOTE [loss dtype])."""
    ops = [n for n in nodes if layout_kind(n) is None]
    if not ops:
        return registry.register_cast(out_dtype or dtype, amp, compiled)
    if len(ops) == 1 and _cast_dtype(ops[0]) is not None and out_dtype in (None, _cast_dtype(ops[0])):
        return registry.register_cast(_cast_dtype(ops[0]), amp, compiled)
    g = fx.Graph()
    cur = g.placeholder("z")
    for n in ops:
        cur = g.node_copy(n, lambda a, cur=cur: cur)
    out = tval(ops[-1])
    if out_dtype is not None and out_dtype != out.dtype:
        cur = g.call_method("to", (cur, out_dtype))
    g.output(cur)
    od = out_dtype or out.dtype
    return registry.register(kind, fx.GraphModule(torch.nn.Module(), g), int(out.shape[-1]), od, autocast=amp,
                             compiled=compiled)  # fmt: skip


def _cast_dtype(n: fx.Node) -> torch.dtype | None:
    """The dtype a pure dtype conversion (``.float()``, ``.to(torch.float32)``) converts to, else None."""
    methods = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}
    if n.op == "call_method" and n.target in methods and len(n.args) == 1 and not n.kwargs:
        return methods[n.target]
    if n.op == "call_method" and n.target == "to":
        rest = [*n.args[1:], *n.kwargs.values()]
        dts = [a for a in rest if isinstance(a, torch.dtype)]
        if len(dts) == 1 and all(isinstance(a, (torch.dtype, bool)) for a in rest):
            return dts[0]
    return None


def rewrite(gm: fx.GraphModule, ctx: PassContext) -> None:
    if not ctx.config.head:
        return
    for ce in list(gm.graph.nodes):
        if bind_cross_entropy(ce) is None or ce in ctx.claimed:
            continue
        rec = Region("head", ce.name, "skipped")
        ctx.regions.append(rec)
        try:
            m = find_head(ce, ctx)
            plan = _plan(m, ctx)
        except Exception as e:  # noqa: BLE001 - CantChunk, or a bug: either way this region stays as it was
            skip(rec, e)
            ctx.claimed.add(ce)
            continue
        _apply(gm, m, plan, ctx, rec)  # a failure past this point falls back for the whole graph


@dataclass
class HeadPlan:
    spec: HeadSpec
    mode: str  # what happens to returned logits: none | bridge | plain | skip
    label: str


def _plan(m: HeadMatch, ctx: PassContext) -> HeadPlan:
    """Everything that can fail, decided before the graph is touched."""
    h, w, b = linear_args(m.lin)
    hv, wv, lv = tval(h), tval(w), tval(m.lin)
    vocab, hidden = int(wv.shape[0]), int(wv.shape[1])
    split = m.chain.index(m.exposed) + 1 if m.exposed in m.chain else 0
    pre_nodes, post_nodes = m.chain[:split], m.chain[split:]
    check_tail_inputs(m.chain, m.lin)
    amp = region_autocast([m.lin] + m.chain, autocast_states(m.lin.graph))
    pre_key = _body(pre_nodes, "pre", lv.dtype, amp)
    # NOTE [loss dtype]: the loss's dtype is eager's (the cross_entropy node's fake value): under autocast,
    # cross_entropy is on the fp32 list, so bf16 logits give an fp32 loss. The post body ends in that dtype;
    # the op computes each chunk's cross-entropy in at least fp32 and sums the chunks in fp32.
    ce_dtype = tval(m.ce).dtype
    post_key = _body(post_nodes, "post", tval(m.exposed).dtype if m.exposed is not None else lv.dtype, amp, ce_dtype,
                     ctx.config.compiles_bodies(hv.device.type))  # fmt: skip
    cfg = ctx.config
    grad = region_grad([m.lin] + m.chain + [m.ce], ctx, m.lin.graph)  # NOTE [grad mode per node]
    needs = tuple(bool(grad and v is not None and v.requires_grad) for v in (hv, wv, tval(b)))
    mode = "none"
    if m.exposed is not None and not ctx.allow_logits_output and any(needs):
        raise CantChunk("the logits are also returned, and the Inductor-pass mode cannot re-attach their gradient "
                        "outside the graph (use backend='mst')")  # fmt: skip
    if m.exposed is not None:
        mode = "skip" if cfg.logits == "skip" else ("bridge" if any(needs) else "plain")
    # one chunk's fp32 logits about the size of the hidden states (NOTE [auto chunk count])
    rows = math.prod(hv.shape[:-1]) if all(isinstance(d, int) for d in hv.shape[:-1]) else None
    pre, post = registry.get(pre_key), registry.get(post_key)
    row_bytes = vocab * _tail_bytes(pre_nodes + post_nodes, pre, post, lv.dtype)
    plan = chunk_plan(cfg, rows=rows, input_size=hidden * hv.element_size(), wide_size=vocab * 4, row_bytes=row_bytes,
                      device_type=hv.device.type, device_index=hv.device.index,
                      fixed_bytes=accumulator_bytes([v for v, n in zip((wv, tval(b)), needs[1:]) if n]),
                      whole_row_bytes=_whole_bytes(pre, post, vocab, lv.element_size()))  # fmt: skip
    if plan.whole:
        raise CantChunk(f"the whole logits are left to Inductor: {plan.why}")
    spec = HeadSpec(pre_key, post_key, m.args["ignore_index"], float(m.args["label_smoothing"]), plan.chunks, needs,
                    mode in ("bridge", "plain"), m.args["reduction"] == "mean")  # fmt: skip
    return HeadPlan(spec, mode, plan.label)


def _apply(gm: fx.GraphModule, m: HeadMatch, p: HeadPlan, ctx: PassContext, rec: Region) -> None:
    h, w, b = linear_args(m.lin)
    hv, wv, lv = tval(h), tval(w), tval(m.lin)
    vocab, hidden = int(wv.shape[0]), int(wv.shape[1])
    mode, label = p.mode, p.label
    g = gm.graph
    target = m.args["target"]
    with g.inserting_before(m.ce):
        if m.exposed is not None and any(layout_kind(n) == "getitem" for n in m.chain):
            # NOTE [returned logits, sliced loss]: the logits are returned for every row while the loss reads a
            # slice of them (a shift: ``logits[..., :-1, :]``). Run every row, and give the rows the loss does
            # not read the label ignore_index: same sum, same count of labels, one pass.
            pos, rows = _row_positions(g, h)
            target = _labels_for_all_rows(g, _replay_layout(gm, m, pos, 1, vocab), rows, target, m.args["ignore_index"])
            h_sel = h
        else:
            h_sel = _replay_layout(gm, m, h, hidden, vocab)
        loss, logits = head_nodes(g, h_sel, w, b, target, p.spec, h, vocab)
    loss.meta.update(m.ce.meta)
    m.ce.replace_all_uses_with(loss)
    if m.exposed is not None:
        logits.meta.update(m.exposed.meta)
        _route_logits_output(gm, m, ctx, mode, logits, loss, h, w, b, p.spec)
    for n in reversed([m.lin] + m.chain + [m.ce]):
        g.erase_node(n)
    rec.status, rec.chunks = "rewritten", label
    rec.nodes = [n.name for n in [m.lin] + m.chain + [m.ce]]
    rec.shapes = f"h={list(hv.shape)} vocab={vocab} logits={mode if m.exposed is not None else 'not returned'}"
    # the logits and each dtype change of them (an fp32 upcast) existed whole; now one chunk of each does
    full = numel_bytes(lv) + sum(numel_bytes(tval(n)) for n in m.chain if _cast_dtype(n) is not None)
    rec.bytes_saved = int(full * (1 - 1 / int(label))) if label.isdigit() else 0
    ctx.claimed.update([m.lin, m.ce] + m.chain)


def _route_logits_output(gm, m, ctx, mode, logits, loss, h, w, b, head: HeadSpec) -> None:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    flat = list(out.args[0]) if isinstance(out.args[0], (tuple, list)) else [out.args[0]]
    slots = [i for i, a in enumerate(flat) if a is m.exposed]
    repl = loss if mode == "skip" else logits
    flat = [repl if a is m.exposed else a for a in flat]
    extra_start = len(flat)
    extras = [h, w] + ([b] if b is not None else [])
    if mode in ("bridge", "skip"):
        flat += extras
    out.args = (tuple(flat),)
    lv = tval(m.exposed)
    body = registry.register_logits(head.pre, int(lv.shape[-1]), lv.dtype)
    extra = list(range(extra_start, extra_start + len(extras))) if mode != "plain" else []
    ctx.logits_outputs.append(LogitsOutput(slots, mode, extra, RowwiseSpec(body, head.chunks).dumps()))

