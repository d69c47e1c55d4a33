"""What the passes on both IRs share: the fake value recorded on a node, and the source hash that keys
Inductor's caches on a pass's code."""

from __future__ import annotations

import hashlib
import inspect

import torch
from torch import fx


def val(n):
    """The fake value recorded for a node (Dynamo's ``example_value``, AOTAutograd's ``val``; ``None`` if missing)."""
    if not isinstance(n, fx.Node):
        return None
    v = n.meta.get("example_value", n.meta.get("val"))
    return v


def tval(n) -> torch.Tensor | None:
    v = val(n)
    return v if isinstance(v, torch.Tensor) else None


def source_hash(*modules) -> str:
    """A hash of these modules' source: the ``uuid`` of an Inductor custom pass, so that Inductor's caches
    never serve a graph one version of a pass rewrote to another version."""
    return hashlib.sha1("".join(inspect.getsource(m) for m in modules).encode()).hexdigest()
