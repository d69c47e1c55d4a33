"""The frozen description of a chunk body: the one string argument through which an op learns its body.

NOTE [body spec]: every ``mst::*`` op names its per-chunk body by a :class:`BodySpec` serialized as one ``str``
argument (``BodySpec.dumps``; parsed once per string, ``parse``). The spec holds everything the op's contract
depends on: the output width and dtype (all a fake kernel needs: no registry lookup at trace time), the exit
projection, the autocast state, and the body itself, as the pickled ``fx.GraphModule`` (base64; a
``GraphModule`` pickles through its generated code) or as the dtype of a cast body. So

* the compiled graph is self-contained: a process where mst's passes never ran (a warm cache, Inductor's
  subprocess compile, ``torch.compiler.load_cache_artifacts``) rebuilds the body from the string
  (``registry.get``), and
* the string is the cache key: Inductor's and AOTAutograd's caches hash the graph's constants, so a changed
  body, output or ops version (``version``, NOTE [cache keys]) is a different graph.

The pass that builds the spec, the op that runs it and the logits rebuild (``logits.py``) read the same fields.
Bodies registered as plain Python functions (``registry.register_fn``: tests, tools) carry only a ``name`` and
run only in the process that registered them. Unpickling the body trusts the graph's constants exactly as
loading Inductor's cache trusts its pickles: both come from the same cache directory.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import pickle
from dataclasses import asdict, dataclass

import torch

PREFIX = "mst-body:"


def dtype_name(dtype: torch.dtype | None) -> str:
    return "" if dtype is None else str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype | None:
    if not name:
        return None
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"mst: {name!r} in a body spec is not a torch dtype")
    return dt


@dataclass(frozen=True)
class BodySpec:
    """What an op needs to know about its body; see NOTE [body spec]."""

    kind: str  # mlp | moe | pre | post | cast | logits | a caller's name (register_fn)
    version: str  # the ops' source hash (NOTE [cache keys])
    out_features: int = -1  # -1: the input's width (a cast body)
    out_dtype: str = ""  # "": the input's dtype
    exit_w: int = -1  # NOTE [exit projection]
    exit_b: int = -1
    autocast: tuple = ()  # (device_type, dtype name) when the region ran under autocast (NOTE [autocast])
    compiled: bool = False  # NOTE [compiled bodies]
    cast_only: bool = False
    graph: str = ""  # base64 of the pickled body GraphModule
    name: str = ""  # a process-local function's name (register_fn): not rebuildable elsewhere
    pre: str = ""  # logits: the head's pre body spec, applied after ``linear(h, w, b)``

    @property
    def dtype(self) -> torch.dtype | None:
        return dtype_of(self.out_dtype)

    @property
    def amp(self) -> tuple | None:
        """The autocast state as ``(device_type, torch.dtype)``, or None."""
        return (self.autocast[0], dtype_of(self.autocast[1])) if self.autocast else None

    def dumps(self) -> str:
        return PREFIX + json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """A short content hash (log lines, the registry's key)."""
        return hashlib.sha1(self.dumps().encode()).hexdigest()[:16]


def amp_field(autocast) -> tuple:
    """``(device_type, torch.dtype)`` or None -> the spec's ``autocast`` field."""
    return (autocast[0], dtype_name(autocast[1])) if autocast else ()


def pickle_graph(gm: torch.fx.GraphModule) -> str:
    return base64.b64encode(pickle.dumps(gm, protocol=4)).decode("ascii")


def unpickle_graph(text: str) -> torch.fx.GraphModule:
    return pickle.loads(base64.b64decode(text.encode("ascii")))


@functools.lru_cache(maxsize=None)
def parse(text: str) -> BodySpec:
    """The spec a string argument of an op holds (once per distinct string)."""
    if not text.startswith(PREFIX):
        raise ValueError(f"mst: {text[:60]!r} is not a body spec (ops take BodySpec.dumps() strings)")
    fields = json.loads(text[len(PREFIX) :])
    fields["autocast"] = tuple(fields.get("autocast") or ())
    return BodySpec(**fields)
