"""Content-addressed registry of the per-chunk bodies that the chunked ops run.

The custom ops are opaque to Inductor and take only tensors and plain values, so the per-chunk math (an
``fx.GraphModule`` cut out of the user's graph) is registered here and named by a key string that the op
receives. NOTE [content-addressed keys]: the key is a hash of the body's code and its constants, never a
counter, so two processes (or two compiles whose FX-graph cache entry is shared) that produce the same
graph agree on what each key means.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch

_BODIES: dict[str, "Body"] = {}


@dataclass(frozen=True)
class Body:
    """A row-wise function ``fn(x_chunk, *params) -> out_chunk`` and what its output looks like."""

    fn: Callable[..., torch.Tensor]
    out_features: int
    out_dtype: torch.dtype | None  # None: same dtype as the input
    code: str
    cast_only: bool = False  # the body only converts dtype (or is the identity): ops may take a fused path


def register(kind: str, gm: torch.fx.GraphModule, out_features: int, out_dtype: torch.dtype | None) -> str:
    code = gm.code
    digest = hashlib.sha1(f"{kind}|{out_features}|{out_dtype}|{code}".encode()).hexdigest()[:16]
    key = f"{kind}:{digest}"
    if key not in _BODIES:
        _BODIES[key] = Body(gm, out_features, out_dtype, code)
    return key


def get(key: str) -> Body:
    try:
        return _BODIES[key]
    except KeyError:
        raise RuntimeError(
            f"mst: chunk body {key!r} is not registered in this process; the graph that uses it was "
            "compiled elsewhere. Clear the compile caches (torch._dynamo.reset()) and compile again."
        ) from None


def register_fn(kind: str, name: str, fn: Callable, out_features: int = -1, out_dtype=None) -> str:
    """Register a plain Python function (used by tests and by the identity tail)."""
    key = f"{kind}:{name}"
    _BODIES[key] = Body(fn, out_features, out_dtype, name)
    return key


def register_cast(dtype: torch.dtype) -> str:
    """The body ``z -> z.to(dtype)`` (the identity when ``z`` already has that dtype)."""
    key = f"cast:{dtype}"
    if key not in _BODIES:
        _BODIES[key] = Body(lambda z: z.to(dtype), -1, dtype, key, cast_only=True)
    return key
