"""Joint-graph pass: recompute cheap per-token values in backward instead of keeping them from the forward.

NOTE [selective recompute]: once the MLP and the head are chunked, what a long-sequence step keeps is the
``tokens x H`` activations Inductor's partitioner saves per layer, the norm outputs and q, k, v among them: it
bans recomputing values that backward materializes anyway (``ban_recompute_materialized_backward``: a matmul
reads them), which saves bandwidth and costs memory, and it never recomputes a matmul. So this pass tags them
for recompute, and a tag never makes the step keep more (the safety rules below).

It tags forward nodes of the joint graph with ``CheckpointPolicy.PREFER_RECOMPUTE`` (the tag selective
activation checkpointing uses; the min-cut partitioner must honour it and then schedules each recomputation
just before its first backward use), in two families:

- ``norms``: the row-wise chain between a normalization and the matmuls or mst ops that read its output
  (``w * (x * rsqrt(mean(x^2) + eps))``): recomputed from the norm's input and its per-token statistic, which
  the norm's own backward keeps anyway. No GEMM is repeated.
- ``attention`` (adds to ``norms``): the attention op's q, k and v, back through RoPE and their projection
  GEMMs to that same norm chain, recomputed right before the attention backward. Costs the q, k, v GEMMs once
  more (the head and the MLP dominate a step's FLOPs); frees q, k, v between forward and backward.

Before (saved for backward, per layer)::  x, n1 = norm(x), q, k, v, o, o_proj(o), n2, layer output
After::                                   x, o, o_proj(o), layer output      (+ per-token statistics)

(the layer output is the next layer's ``x``: 18 -> 8 ``tokens x H`` tensors on the benchmark's 2-layer Llama,
the head's input gradient and the final norm's input included.)

Safety rules, so that a tag never makes the step keep more: a node is tagged only if every forward user of it
is tagged too (or is the op that consumes the family: the attention op, a matmul, an mst op), so nothing
outside the recomputed chain loses the value; and every value a tagged chain reads from outside must be
kept anyway: a graph input, a value backward reads itself, or a small one (under 1/8 of the chain's largest
tensor, such as the statistic or RoPE's position table). A chain that would need anything else is left alone.
Random ops, nodes that already carry a recompute policy (the user's checkpointing) and the backward are never
tagged; the one change to the user's policy is that a checkpointed region's output read outside every region
is saved (NOTE [checkpointed region outputs]). Backward nodes are those AOTAutograd marks ``is_backward`` or
that read a tangent (a decomposed LayerNorm backward recomputes ``x - mean`` without reading a tangent).
"""

from __future__ import annotations

import logging

import torch
from torch import fx
from torch.utils.checkpoint import CheckpointPolicy

from ...report import counters
from ..shared import val
from .base import InductorPass, numel, tangent_inputs
from .ops import ATTENTION, GEMMS, cheap, gemm_input, is_mst_op

log = logging.getLogger("mst_compile")


_RECOMPUTE_POLICIES = (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_RECOMPUTE)
_SMALL = 8  # a value read from outside a chain is "small" when 8 of it fit in the chain's largest tensor


class _Joint:
    """The forward part of a joint graph and which forward values backward reads directly."""

    def __init__(self, graph: fx.Graph):
        tangents = tangent_inputs(graph)
        backward = set(tangents)
        for n in graph.nodes:  # AOTAutograd tags what it traced for backward; a decomposed norm backward
            # recomputes ``x * x`` without reading a tangent, so the tag, not only the data flow, decides
            tagged = n.meta.get("partitioner_tag") == "is_backward"
            if n.op != "output" and (tagged or any(a in backward for a in n.all_input_nodes)):
                backward.add(n)
        self.has_backward = bool(tangents)
        self.forward = {n for n in graph.nodes if n.op == "call_function" and n not in backward}
        self.read_by_backward = {n for n in graph.nodes if any(u in backward for u in n.users)}
        # forward nodes whose results only backward reads (a ``detach`` of a statistic, a weight's transpose)
        self.backward_only: set[fx.Node] = set()
        for n in reversed(graph.nodes):
            if n in self.forward and n.users and all(u in backward or u in self.backward_only for u in n.users):
                self.backward_only.add(n)

    def walkable(self, n, gemms: bool) -> bool:
        return (
            isinstance(n, fx.Node) and n in self.forward and "recompute" not in n.meta
            and (cheap(n) or (gemms and n.target in GEMMS))
        )  # fmt: skip

    def cone(self, starts, consumers: set, gemms: bool) -> set:
        """The recomputable chain behind ``starts``, pruned until the safety rules of the module note hold."""
        cone: set[fx.Node] = set()
        stack = [s for s in starts if self.walkable(s, gemms)]
        while stack:
            n = stack.pop()
            if n in cone:
                continue
            cone.add(n)
            stack += [a for a in n.all_input_nodes if self.walkable(a, gemms)]
        big = max((numel(n) for n in cone), default=0)
        changed = True
        while changed:
            changed = False
            for n in list(cone):
                private = all(u in cone or u in consumers or u not in self.forward or u in self.backward_only
                              for u in n.users)  # fmt: skip
                if not private or any(a not in cone and not self._kept(a, big) for a in n.all_input_nodes):
                    cone.discard(n)
                    changed = True
        return cone

    def _kept(self, a: fx.Node, big: int) -> bool:
        """``a`` is available to backward at no extra cost: an input, read by backward, already tagged by the
        user, or small next to the largest tensor of the chain."""
        if a.op == "placeholder" or a in self.read_by_backward or "recompute" in a.meta:
            return True
        # a multi-output op (``split_with_sizes``) cannot be saved, only its pieces: a piece stays in the chain
        # only with the op itself (else the partitioner finds a value it can neither save nor recompute)
        return isinstance(val(a), torch.Tensor) and numel(a) * _SMALL <= big


def tag_recompute(graph: fx.Graph, mode: str) -> int:
    """Tag the ``mode`` families (NOTE [selective recompute]) in a joint graph; returns how many nodes."""
    if mode == "none":
        return 0
    joint = _Joint(graph)
    if not joint.has_backward:
        return 0  # an inference graph: nothing is saved
    fwd = joint.forward
    tags: set[fx.Node] = set()
    consumers = {n for n in fwd if n.target in GEMMS or is_mst_op(n)}
    starts = [gemm_input(n) if n.target in GEMMS else n.args[0] for n in consumers]
    tags |= joint.cone(starts, consumers, gemms=False)
    attentions = 0
    if mode == "attention":
        for att in (n for n in fwd if n.target in ATTENTION):
            chain = joint.cone([a for a in att.args[:3] if isinstance(a, fx.Node)], {att}, gemms=True)
            if any(a in chain for a in att.args[:3]):
                attentions += 1
            tags |= chain
    for n in tags:
        n.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
    region_outputs = _save_region_outputs(joint, tags)
    counters["checkpoint_outputs_saved"] += region_outputs
    if tags:
        counters["recompute_tagged"] += len(tags)
        counters["attention_inputs_recomputed"] += attentions
        log.debug("mst: %d forward nodes recomputed in backward (%d attention inputs)", len(tags), attentions)
    return len(tags)


def _save_region_outputs(joint: _Joint, tags: set[fx.Node]) -> int:
    """NOTE [checkpointed region outputs]: under the user's activation checkpointing (HF's
    ``gradient_checkpointing_enable``) every node of a checkpointed layer carries a recompute policy and its
    region's ``ac_graph_id``, the layer's output included. Functorch saves a region's output only when the next
    checkpointed region reads it (``cleanup_recompute_tags``). The last layer's output feeds the final norm,
    outside every region, so the partitioner may not save it and recomputes it instead: the whole last layer,
    attention included, before the head's backward, held through that layer's own backward. Eager checkpointing
    never does that: the final norm saves its input. So a region's output that code outside every region reads
    in forward is saved (``MUST_SAVE``) when backward reads it or a chain tagged here recomputes from it, as
    eager would."""
    saved = 0
    for n in joint.forward:
        if "ac_graph_id" not in n.meta or n.meta.get("recompute") not in _RECOMPUTE_POLICIES:
            continue
        outside = [u for u in n.users if u in joint.forward and "ac_graph_id" not in u.meta]
        if outside and (n in joint.read_by_backward or any(u in tags for u in outside)):
            n.meta["recompute"] = CheckpointPolicy.MUST_SAVE
            saved += 1
    return saved


class RecomputePass(InductorPass):
    """The pass as Inductor's ``joint_custom_pre_pass`` (runs on the joint graph before partitioning)."""

    what = "the selective-recompute pass"

    def __init__(self, mode: str):
        self.mode = mode

    def run(self, graph: fx.Graph) -> int:
        return tag_recompute(graph, self.mode)

    def key(self) -> str:
        return self.mode
