"""Post-grad pass on the backward graph: compute a cheap value again after a big op instead of keeping it across.

NOTE [second recompute]: the partitioner recomputes each tagged forward value once, just before its first
backward use, and keeps it until its last. Some values have uses on both sides of the backward's big ops (the
attention backward, mst's chunk loops), where the step's peak is:

- the norm output ``n`` and the normalized ``x_hat``: read to recompute q, k, v right before the attention
  backward, then by the q, k, v weight gradients and the norm's weight gradient after it;
- under the user's activation checkpointing, q, k, v themselves: recomputed with the layer's attention forward
  (the MLP's backward needs the layer's residual), kept through the MLP's backward for the attention backward.

Keeping them across costs ``tokens x H`` each at the peak. This pass clones the chain that computes such a value
(row-wise ops, views, and matmuls against forward inputs) right before its first use after the big op, from
values that are alive there anyway, so the first copy dies before the big op::

    Before:  n = w * (x * rstd);  q, k, v = rope(n @ Wqkv);  dq, dk, dv = attn_bwd(q, k, v, ...);  dW = n^T dq
    After:   n = w * (x * rstd);  q, k, v = rope(n @ Wqkv);  dq, dk, dv = attn_bwd(q, k, v, ...)
             n' = w * (x * rstd);  dW = n'^T dq                    (x, rstd, w alive here anyway)

A value is cloned only when every tensor its clone reads is a forward input (parameters, the caller's
inputs: alive for the whole step), still used at the clone's place anyway, or small (1/8 of the value); a chain
that would extend any other lifetime, or that contains a random or an expensive op, is left alone
(``_CantRemat``). It takes the big ops in order, so a clone made for one big op that crosses the next is cloned
again after that one. There is no CSE after the partition, so the copies stay apart (in the joint graph the
partitioner's CSE would merge them back).
"""

from __future__ import annotations

import logging
import operator

import torch
from torch import fx

from ...report import counters
from ..shared import val
from .base import InductorPass, numel, tangent_inputs
from .ops import GEMMS, cheap, is_big_backward_op, is_view

log = logging.getLogger("mst_compile")

_SMALL = 8


class _CantRemat(Exception):
    """A value's chain cannot be cloned without extending a lifetime or repeating an expensive op."""


class _Lifetimes:
    """Positions, storage owners (a view's owner is its base's), each owner's last use and its readers (the
    nodes that read it or a view of it, in graph order) in a graph."""

    def __init__(self, graph: fx.Graph):
        self.nodes = list(graph.nodes)
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        self.owner: dict[fx.Node, fx.Node] = {}
        for n in self.nodes:
            self.owner[n] = self._owner_of(n)
        self.reads: dict[fx.Node, tuple] = {}  # each node's input owners
        self.readers: dict[fx.Node, list[fx.Node]] = {}
        for n in self.nodes:
            self.reads[n] = tuple(dict.fromkeys(self.owner[a] for a in n.all_input_nodes))
            for o in self.reads[n]:
                self.readers.setdefault(o, []).append(n)
        self.last = {o: self.pos[rs[-1]] for o, rs in self.readers.items()}

    def _owner_of(self, n: fx.Node) -> fx.Node:
        a = n.args[0] if n.args else None
        view = is_view(n) or (n.target is operator.getitem and isinstance(a, fx.Node) and is_view(a))
        return self.owner[a] if view and isinstance(a, fx.Node) else n

    def update(self, graph: fx.Graph, changed: list[fx.Node]) -> None:
        """The same tables after ``changed`` nodes were inserted or had their inputs replaced (in graph order),
        without walking every node's inputs again (NOTE [remat cost])."""
        self.nodes = list(graph.nodes)
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        stale, stack = set(changed), list(reversed(changed))
        while stack:  # a new owner passes to the views of the node, and to their readers' tables
            n = stack.pop()
            o = self._owner_of(n)
            if self.owner.get(n) is not o:
                self.owner[n] = o
                stale.update(n.users)
                stack += [u for u in reversed(list(n.users)) if u.args and u.args[0] is n]
        touched = set()
        for n in stale:
            new = tuple(dict.fromkeys(self.owner[a] for a in n.all_input_nodes))
            old = self.reads.get(n, ())
            self.reads[n] = new
            for o in set(old) - set(new):
                self.readers[o].remove(n)
            for o in set(new) - set(old):
                self.readers.setdefault(o, []).append(n)
                touched.add(o)
        for o in touched:
            self.readers[o].sort(key=self.pos.__getitem__)
        self.last = {o: self.pos[rs[-1]] for o, rs in self.readers.items() if rs}

    def readers_after(self, owners, p: int) -> list[fx.Node]:
        """The nodes after position ``p`` that read any of ``owners`` (or a view of one), in graph order."""
        found = {u for o in owners for u in self.readers.get(o, ()) if self.pos[u] > p}
        return sorted(found, key=self.pos.__getitem__)

    def step_input(self, o: fx.Node) -> bool:
        """A forward input (parameter, buffer, the caller's tensor): alive for the whole step."""
        return o.op == "placeholder" and o.name.startswith("primals")


def _remat_one(graph: fx.Graph, life: _Lifetimes, b: fx.Node) -> int:
    """Clone what crosses ``b`` and can be rebuilt after it; returns how many values stopped crossing."""
    pb = life.pos[b]
    inputs = {life.owner[a] for a in b.all_input_nodes}
    big = max((numel(o) for o in inputs), default=0)
    crossing = {
        o for o in set(life.owner.values())
        if o.op == "call_function" and life.pos[o] < pb < life.last.get(o, -1) and o not in inputs
        and numel(o) * 2 >= big
    }  # fmt: skip
    plan = _plan(life, crossing, pb)
    if not crossing:
        return 0
    _apply(graph, plan, life.readers_after(crossing, pb), life)
    return len(crossing)


def _plan(life: _Lifetimes, crossing: set, pb: int) -> dict[fx.Node, int]:
    """For each node to clone, the position of its first later reader (where the clone goes). A value whose
    chain cannot be cloned is dropped from ``crossing`` (it stays alive across the big op: the others may read
    it) and the plan made again for the others.

    NOTE [remat cost]: the weight gradients made before a big op are alive to the output, so they cross every
    later big op, and each fails there: dropped one at a time, the plan is made once per layer at each of the
    layers' big ops, and a plan that walks the graph after the big op would make the pass cubic in the layer
    count (20 s on a 32-layer tiny Gemma-3 backward graph). So the readers come from an index, the lifetime
    tables are updated after each big op rather than rebuilt, and a failed value that nothing planned before it
    looked at (no crossing test of it came out true) only undoes its own part of the plan: the plan continues
    from there, as a new plan would (every test it made reads the same)."""
    while crossing:
        plan: dict[fx.Node, int] = {}
        seen: set[fx.Node] = set()  # crossing values whose membership test came out true so far
        undo: list = []  # what the current value's walk changed: (node, previous position or None)

        def need(a: fx.Node, at: int, target: fx.Node) -> None:
            o = life.owner[a]
            if not isinstance(val(a), torch.Tensor):
                return  # a size: no memory to free or keep
            if o in crossing:
                if o not in seen:
                    seen.add(o)
                    undo.append((o, "seen"))
            elif life.step_input(o) or life.last.get(o, -1) >= at or numel(o) * _SMALL <= numel(target):
                return  # alive at ``at`` anyway, or small
            if a.op != "call_function" or not (cheap(a) or a.target in GEMMS):
                raise _CantRemat(target)
            if a in plan:
                undo.append((a, plan[a]))
                plan[a] = min(plan[a], at)
                return
            undo.append((a, None))
            plan[a] = at
            for x in a.all_input_nodes:
                need(x, at, target)

        try:
            for u in life.readers_after(crossing, pb):
                for a in u.all_input_nodes:
                    o = life.owner[a]
                    if o not in crossing:
                        continue
                    looked_at = o in seen
                    undo.clear()
                    try:
                        need(a, life.pos[u], o)
                    except _CantRemat:
                        if looked_at:
                            raise
                        for n, prev in reversed(undo):  # only this value's walk depended on it: undo that
                            if prev == "seen":
                                seen.discard(n)
                            elif prev is None:
                                del plan[n]
                            else:
                                plan[n] = prev
                        crossing.discard(o)
        except _CantRemat as e:
            crossing.discard(e.args[0])
            continue
        return plan
    return {}


def _apply(graph: fx.Graph, plan: dict[fx.Node, int], later: list[fx.Node], life: _Lifetimes) -> None:
    clones: dict[fx.Node, fx.Node] = {}
    for n in sorted(plan, key=life.pos.__getitem__):  # inputs before users
        with graph.inserting_before(life.nodes[plan[n]]):
            clones[n] = graph.node_copy(n, lambda a: clones.get(a, a))
    rewired = []
    for u in later:
        if any(a in clones for a in u.all_input_nodes):
            u.args, u.kwargs = fx.map_arg((u.args, u.kwargs), lambda a: clones.get(a, a))
            rewired.append(u)
    life.update(graph, [*clones.values(), *rewired])


def remat_across_barriers(graph: fx.Graph) -> int:
    """NOTE [second recompute] on a backward graph; returns how many values were cloned past a big op."""
    if not tangent_inputs(graph):
        return 0  # a forward or inference graph
    total = 0
    barriers = [n for n in graph.nodes if is_big_backward_op(n)]
    life = _Lifetimes(graph)  # kept up to date by ``_apply``
    for b in barriers:  # in order: clones land after ``b``, so earlier big ops never see new crossings
        total += _remat_one(graph, life, b)
    if total:
        graph.eliminate_dead_code()
        graph.lint()
        counters["values_recomputed_again"] += total
        log.debug("mst: %d backward values recomputed again after a big op", total)
    return total


class RematPass(InductorPass):
    """The pass as Inductor's ``post_grad_custom_pre_pass`` (runs on the forward and backward graphs)."""

    what = "the second-recompute pass"

    def run(self, graph: fx.Graph) -> int:
        return remat_across_barriers(graph)
