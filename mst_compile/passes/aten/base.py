"""The base of mst's Inductor custom passes, which run on Inductor's aten graphs (joint, forward, backward)."""

from __future__ import annotations

import logging
import sys

import torch
from torch import fx

from ... import _compat
from .. import shared
from . import ops


class InductorPass(_compat.CustomGraphPass):
    """One of mst's Inductor custom passes: ``run(graph)`` rewrites in place; a failure is a missed saving,
    never a failed compile (logged, graph left as the pass left it: every pass writes valid graphs step by
    step). ``uuid`` keys Inductor's cache: the source of the defining module and of the modules every pass reads
    (this one, the op classification, the shared helpers), and ``key()``."""

    #: what the warning calls the pass
    what = "an mst pass"

    def run(self, graph: fx.Graph) -> object:
        raise NotImplementedError

    def key(self) -> str:
        return ""

    def __call__(self, graph: fx.Graph) -> None:
        try:
            self.run(graph)
        except Exception:  # noqa: BLE001
            logging.getLogger("mst_compile").warning("mst: %s failed; graph left as it was", self.what, exc_info=True)

    def uuid(self):
        return shared.source_hash(sys.modules[type(self).__module__], sys.modules[__name__], ops, shared) + self.key()


def tangent_inputs(graph: fx.Graph) -> list[fx.Node]:
    """The placeholders AOTAutograd names ``tangents_*``: the incoming gradients of a joint or backward graph
    (none in a forward or inference graph)."""
    return [n for n in graph.find_nodes(op="placeholder") if n.name.startswith("tangents")]


def numel(n) -> int:
    """The element count of a node's tensor value (its size hint when symbolic), 0 for anything else."""
    v = shared.val(n)
    return _compat.size_hint(v.numel()) if isinstance(v, torch.Tensor) else 0
