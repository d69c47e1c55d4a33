"""Pass: a cross-entropy taken over split pieces of the logits and summed becomes one over the whole logits.

Before::  pieces, ys = logits.split(c), targets.split(c)
          loss = torch.cat([cross_entropy(pieces[i], ys[i], reduction="none") for i in range(k)]).sum()
After::   loss = cross_entropy(logits, targets, reduction="sum")

(litgpt's ``chunked_cross_entropy``, whose default splits every 128 rows.) Both are the sum of the same
per-row losses, an ignored row adding 0 either way; only the order of the fp32 summation differs. What follows
the sum (litgpt divides by the count of labels) stays as it was. The head pass then fuses the projection with
the one cross-entropy. Rewritten only when the pieces are every piece of one split of the logits and the same
split of the targets, in order, each read only by its cross-entropy, and the concatenation only by the sum.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.nn.functional as F
from torch import fx

from ..shared import tval
from .context import PassContext
from .nodes import bind_cross_entropy

log = logging.getLogger("mst_compile.passes")


def rewrite(gm: fx.GraphModule, ctx: PassContext) -> None:
    g = gm.graph
    for total in list(g.nodes):
        match = _match(total)
        if match is None:
            continue
        cat, losses, splits, logits, targets, args = match
        with g.inserting_before(total):
            ce = g.call_function(F.cross_entropy, (logits, targets),
                                 {"ignore_index": args["ignore_index"], "reduction": "sum",
                                  "label_smoothing": args["label_smoothing"]})  # fmt: skip
        ce.meta.update(total.meta)
        total.replace_all_uses_with(ce)
        pieces = [b for loss in losses for b in loss.all_input_nodes if b.target is operator.getitem]
        for n in [total, cat, *losses, *pieces]:
            if not n.users:
                g.erase_node(n)
        for n in splits:
            if not n.users:
                g.erase_node(n)
        log.debug("mst: a cross-entropy over %d split pieces is one over %s", len(losses), logits.name)


def _is_split(n) -> bool:
    return isinstance(n, fx.Node) and (
        (n.op == "call_method" and n.target == "split") or (n.op == "call_function" and n.target is torch.split)
    )


def _split_args(n: fx.Node) -> tuple | None:
    """``(source, sizes)`` of a split along dim 0, else None."""
    if not _is_split(n) or len(n.args) < 2:
        return None
    dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else 0)
    if dim != 0 or set(n.kwargs) - {"dim", "split_size_or_sections", "split_size"}:
        return None
    sizes = n.args[1]
    return (n.args[0], tuple(sizes) if isinstance(sizes, (list, tuple)) else sizes)


def _pieces(nodes: list, k: int) -> fx.Node | None:
    """The split whose ``k`` pieces ``nodes`` are, in order, or None."""
    if not nodes or not all(isinstance(p, fx.Node) and p.target is operator.getitem for p in nodes):
        return None
    split = nodes[0].args[0]
    pieces = split.meta.get("example_value") if isinstance(split, fx.Node) else None
    if _split_args(split) is None or not isinstance(pieces, (tuple, list)) or len(pieces) != k:
        return None
    if any(p.args[0] is not split or p.args[1] != i or len(p.users) != 1 for i, p in enumerate(nodes)):
        return None
    return split


def _match(total: fx.Node):
    is_sum = (total.op == "call_method" and total.target == "sum") or (
        total.op == "call_function" and total.target is torch.sum)  # fmt: skip
    if not is_sum or len(total.args) != 1 or total.kwargs:
        return None
    cat = total.args[0]
    if not (isinstance(cat, fx.Node) and cat.op == "call_function" and cat.target is torch.cat and len(cat.users) == 1):
        return None
    if cat.kwargs.get("dim", cat.args[1] if len(cat.args) > 1 else 0) != 0 or not isinstance(cat.args[0], (list, tuple)):
        return None
    losses = list(cat.args[0])
    bound = [bind_cross_entropy(n) if isinstance(n, fx.Node) else None for n in losses]
    if not bound or any(b is None for b in bound) or any(len(n.users) != 1 for n in losses):
        return None
    first = bound[0]
    same = ("weight", "size_average", "reduce", "ignore_index", "reduction", "label_smoothing")
    if first["reduction"] != "none" or first["weight"] is not None or any(
        any(b[key] != first[key] for key in same) for b in bound
    ):
        return None
    xs, ys = _pieces([b["input"] for b in bound], len(bound)), _pieces([b["target"] for b in bound], len(bound))
    if xs is None or ys is None or _split_args(xs)[1] != _split_args(ys)[1]:
        return None
    logits, targets = _split_args(xs)[0], _split_args(ys)[0]
    lv, tv = tval(logits), tval(targets)
    if lv is None or tv is None or lv.dim() != 2 or tv.dim() != 1 or tv.dtype.is_floating_point:
        return None
    return cat, losses, (xs, ys), logits, targets, first
