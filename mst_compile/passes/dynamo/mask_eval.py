"""Belt and braces for the causal-mask proof: run the mask's subgraph at concrete lengths, compare with ``tril``.

The symbolic proof (NOTE [causal-mask proof] in ``mask_proof``) decides; this check can only veto. The nodes
the mask depends on are copied into a small graph whose inputs are the scalars they read (sizes, integer
arithmetic on sizes). Under dynamic shapes it runs with every size symbol set to a few small lengths (those its
range admits), under static shapes once, at the one length there is - in both cases only where its tensors are
small (``MAX_BYTES``); beyond that the proof alone decides. A subgraph that reads a runtime tensor is rejected
here too.
"""

from __future__ import annotations

import logging

import sympy
import torch
from torch import fx

from ... import _compat
from ..shared import val
from .context import CantChunk

log = logging.getLogger("mst_compile.passes")

LENGTHS = (1, 2, 3, 5, 8)
MAX_BYTES = 64 * 2**20  # a subgraph with more bytes of tensors (at a length tried) is not run


def _subgraph(mask: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """``(tensor nodes in graph order, scalar inputs)`` of the subgraph computing ``mask``."""
    nodes, scalars, seen, todo = [], [], set(), [mask]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        v = val(n)
        if isinstance(v, (int, torch.SymInt, torch.SymBool)):  # (bool is an int)
            scalars.append(n)
        elif not isinstance(v, torch.Tensor):
            raise CantChunk(f"the mask reads {n.name}, which is neither a tensor nor a scalar")
        elif n.op in ("placeholder", "get_attr"):
            raise CantChunk(f"the mask depends on the runtime tensor {n.name}")
        else:
            nodes.append(n)
            todo += n.all_input_nodes
    order = {n: i for i, n in enumerate(mask.graph.nodes)}
    return sorted(nodes, key=order.__getitem__), sorted(scalars, key=order.__getitem__)


def _admits(sym, length: int, hint) -> bool:
    """``length`` is inside the range the shape environment recorded for ``sym`` (when it is reachable)."""
    shape_env = getattr(getattr(hint, "node", None), "shape_env", None)
    rng = getattr(shape_env, "var_to_range", {}).get(sym) if shape_env is not None else None
    if rng is None:
        return length >= (1 if sym.is_positive else 0)
    try:
        return bool(rng.lower <= length) and bool(length <= rng.upper)
    except TypeError:
        return False


def _small_graph(nodes, scalars, mask) -> fx.GraphModule:
    g = fx.Graph()
    env = {s: g.placeholder(f"in{i}") for i, s in enumerate(scalars)}
    for n in nodes:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[mask])
    return fx.GraphModule(torch.nn.Module(), g)


def check_tril(mask: fx.Node, length, sizes: dict) -> None:
    """Raise ``CantChunk`` unless ``mask`` evaluates to ``tril`` of ``length x length`` (broadcast over any
    leading dimensions) at every length tried. ``sizes``: the size symbols and their ranges."""
    nodes, scalars = _subgraph(mask)
    exprs = [sympy.sympify(_compat.sym_expr(val(s))) for s in scalars]
    syms = set().union(*(e.free_symbols for e in exprs), sympy.sympify(length).free_symbols)
    for n in nodes:
        syms |= set().union(*(sympy.sympify(_compat.sym_expr(d)).free_symbols for d in val(n).shape))
    if syms - sizes.keys():
        raise CantChunk(f"the mask depends on {sorted(map(str, syms - sizes.keys()))}, which are not sizes")
    trials = [{}]
    if syms:
        hint = next((val(s) for s in scalars if isinstance(val(s), torch.SymInt)), None)
        trials = [{s: k for s in syms} for k in LENGTHS if all(_admits(s, k, hint) for s in syms)]
        if not trials:
            raise CantChunk("no small length to evaluate the mask at is inside its size range")
    sizes_of = [(sympy.sympify(_compat.sym_expr(val(n).numel())), val(n).element_size()) for n in nodes]
    small_enough = [t for t in trials if sum(int(e.subs(t)) * b for e, b in sizes_of) <= MAX_BYTES]
    if not small_enough:  # (static shapes: the one length there is; or a large static dimension)
        log.debug("mask %s: more than %d bytes of tensors at every length tried, not evaluated; the proof alone "
                  "decides", mask.name, MAX_BYTES)  # fmt: skip
        return
    trials = small_enough
    small = _small_graph(nodes, scalars, mask)
    for subs in trials:
        try:
            args = [bool(e.subs(subs)) if isinstance(e, sympy.logic.boolalg.Boolean) and not e.is_Symbol
                    else int(e.subs(subs)) for e in exprs]  # fmt: skip
            n = int(sympy.sympify(length).subs(subs))
            with torch.no_grad():
                out = small(*args)
            ok = (type(out) is torch.Tensor and out.dtype == torch.bool and out.dim() >= 2
                  and tuple(out.shape[-2:]) == (n, n))  # fmt: skip
            ok = ok and torch.equal(out, torch.ones(n, n, dtype=torch.bool, device=out.device).tril().expand_as(out))
        except Exception as e:  # noqa: BLE001 - a subgraph that fails to run at this length is not proven
            at = "its static length" if not subs else f"length {next(iter(subs.values()))}"
            raise CantChunk(f"evaluating the mask at {at} failed: {type(e).__name__}: {e}") from e
        if not ok:
            raise CantChunk(f"evaluated at length {n}, the mask is not tril: the symbolic proof is contradicted")
        log.debug("mask %s evaluated at length %d: tril", mask.name, n)
