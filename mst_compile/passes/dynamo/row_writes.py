"""Pass: a tensor filled and then written row by row in an unrolled Python loop becomes one vectorized op.

NOTE [unrolled row writes]: litgpt builds the sliding-window mask of its Gemma 2 and Phi-3 styles as
``m = torch.full((T, T), -inf)`` followed by ``for i in range(T): m[i, start(i):i + 1] = 0.0``. Dynamo unrolls
the loop into ``T`` ``setitem`` nodes on one ``T x T`` tensor, and AOTAutograd functionalizes each into a
``slice_scatter`` producing a new ``T x T`` tensor. The graph and the compile time then grow with ``T`` (past 15
minutes at 4096 tokens), and so does the compiled step's memory: at 1024 tokens it is 1034 MiB where eager needs
148.5 MiB. The written region depends only on constants, so it can be read off the graph: each row's
``[lo, hi)`` and the single value written.

Before::
    m = torch.full((T, C), fill); m[0, lo_0:hi_0] = v; m[1, lo_1:hi_1] = v; ...; use(m)
After::
    j = torch.arange(C); lo = torch.tensor([lo_0, lo_1, ...]); hi = torch.tensor([hi_0, hi_1, ...])
    m = torch.full((T, C), fill).masked_fill((j >= lo[:, None]) & (j < hi[:, None]), v); use(m)

Exact by construction. The rewrite needs Python-int rows and slice bounds (step 1, non-negative, within the
shape), one Python scalar written everywhere, each row written at most once, and every other reader of the tensor
after the last write. Anything else leaves the graph as it was.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx

from ...report import Region
from ..shared import val
from .build import emit
from .context import PassContext

log = logging.getLogger("mst_compile.passes")

#: fewer writes than this are left alone: the loop is short and the graph small
MIN_WRITES = 8


def rewrite(gm: fx.GraphModule, ctx: PassContext) -> None:
    g = gm.graph
    for full in list(g.nodes):
        match = _match(full)
        if match is None:
            continue
        writes, rows, cols, lo, hi, value = match
        last = writes[-1]
        with g.inserting_before(last.next):  # in order, after the last write
            dev = full.kwargs.get("device")
            j = emit(g, "call_function", torch.arange, (cols,), {"device": dev}, like=full)
            lo_n = emit(g, "call_function", torch.tensor, (lo,), {"device": dev}, like=full)
            hi_n = emit(g, "call_function", torch.tensor, (hi,), {"device": dev}, like=full)
            lo_c = emit(g, "call_function", operator.getitem, (lo_n, (slice(None), None)))
            hi_c = emit(g, "call_function", operator.getitem, (hi_n, (slice(None), None)))
            ge = emit(g, "call_function", operator.ge, (j, lo_c))
            lt = emit(g, "call_function", operator.lt, (j, hi_c))
            band = emit(g, "call_function", operator.and_, (ge, lt))
            fresh = emit(g, "call_function", torch.full, full.args, dict(full.kwargs), like=full)
            new = emit(g, "call_method", "masked_fill", (fresh, band, value))
        for w in writes:
            g.erase_node(w)
        full.replace_all_uses_with(new)
        g.erase_node(full)
        ctx.regions.append(Region("rows", full.name, "rewritten", shapes=f"[{rows}, {cols}]",
                                  nodes=[w.name for w in writes]))  # fmt: skip
        log.debug("mst: %d row writes on %s are one masked_fill", len(writes), full.name)


def _const_full(n: fx.Node):
    """``(rows, cols)`` of ``torch.full((rows, cols), scalar, ...)`` with int sizes, else None."""
    if n.op != "call_function" or n.target is not torch.full or len(n.args) != 2:
        return None
    size, fill = n.args
    if not isinstance(fill, (int, float, bool)) or set(n.kwargs) - {"dtype", "device", "layout", "pin_memory"}:
        return None
    if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(type(s) is int for s in size)):
        return None
    return size


def _row_write(n: fx.Node, base: fx.Node, rows: int, cols: int):
    """``(row, lo, hi, value)`` of ``base[row, lo:hi] = value`` with constant ints and a scalar, else None."""
    if n.op != "call_function" or n.target is not operator.setitem or len(n.args) != 3 or n.args[0] is not base:
        return None
    index, value = n.args[1], n.args[2]
    if not (isinstance(index, tuple) and len(index) == 2 and type(index[0]) is int and isinstance(index[1], slice)):
        return None
    row, sl = index
    lo, hi = (0 if sl.start is None else sl.start), (cols if sl.stop is None else sl.stop)
    if sl.step not in (None, 1) or type(lo) is not int or type(hi) is not int or isinstance(value, bool):
        return None
    if not isinstance(value, (int, float)) or not (0 <= row < rows and 0 <= lo <= hi <= cols):
        return None
    return row, lo, hi, value


def _match(full: fx.Node):
    size = _const_full(full)
    if size is None:
        return None
    rows, cols = size
    writes, readers = [], []
    for u in full.users:
        (writes if u.target is operator.setitem else readers).append(u)
    if len(writes) < MIN_WRITES:
        return None
    order = {n: i for i, n in enumerate(full.graph.nodes)}  # only for a candidate: one walk of the graph
    writes.sort(key=order.__getitem__)
    lo, hi, values, seen = [0] * rows, [0] * rows, set(), set()
    for w in writes:
        got = _row_write(w, full, rows, cols)
        if got is None or got[0] in seen:
            return None
        row, lo[row], hi[row], value = got
        seen.add(row)
        values.add(value)
    if len(values) != 1 or any(order[r] < order[writes[-1]] for r in readers):
        return None
    value = values.pop()
    fv = val(full)
    if not isinstance(fv, torch.Tensor) or (isinstance(value, float) and not fv.dtype.is_floating_point):
        return None  # a float written into an integer tensor: setitem's cast, not masked_fill's
    return writes, rows, cols, lo, hi, value
