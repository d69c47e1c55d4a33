"""The frozen specs through which an op learns its contract: one string argument per op.

NOTE [body spec]: every ``mst::*`` op takes its tensors and ONE frozen spec serialized as a ``str`` (``dumps``;
parsed once per string, ``parse``) holding everything its contract depends on: ``mst::rowwise`` and
``mst::rowwise_backward`` a :class:`RowwiseSpec` (the body and the chunk plan), ``mst::linear_ce`` a
:class:`HeadSpec` (the pre and post bodies, the loss's settings, the chunk plan, which gradients and outputs).
A body is a :class:`BodySpec`: its output width and dtype (all a fake kernel needs: no registry lookup at trace
time), the exit projection, the autocast state, and the body itself, as the pickled ``fx.GraphModule`` (base64;
a ``GraphModule`` pickles through its generated code) or as the dtype of a cast body. So

* the compiled graph is self-contained: a process where mst's passes never ran (a warm cache, Inductor's
  subprocess compile, ``torch.compiler.load_cache_artifacts``) rebuilds the body from the string
  (``registry.get``), and
* the string is the cache key: Inductor's and AOTAutograd's caches hash the graph's constants, so a changed
  body, chunk plan, output or ops version (``version``, NOTE [cache keys]) is a different graph.

The pass that builds a spec, the op that runs it and the logits rebuild (``logits.py``) read the same fields,
by name. Bodies registered as plain Python functions (``registry.register_fn``: tests, tools) carry only a
``name`` and run only in the process that registered them. Unpickling the body trusts the graph's constants
exactly as loading Inductor's cache trusts its pickles: both come from the same cache directory.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import json
import pickle
import typing
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from .chunking import Chunks


def dtype_name(dtype: torch.dtype | None) -> str:
    return "" if dtype is None else str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype | None:
    if not name:
        return None
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"mst: {name!r} in a body spec is not a torch dtype")
    return dt


class _Spec:
    """A frozen dataclass as one string: its kind's prefix, then its fields as JSON (NOTE [body spec])."""

    PREFIX: ClassVar[str]

    def dumps(self) -> str:
        return self.PREFIX + json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """A short content hash (log lines, the registry's key)."""
        return hashlib.sha1(self.dumps().encode()).hexdigest()[:16]


@dataclass(frozen=True)
class BodySpec(_Spec):
    """What an op needs to know about its per-chunk body; see NOTE [body spec]."""

    PREFIX: ClassVar[str] = "mst-body:"

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


@dataclass(frozen=True)
class RowwiseSpec(_Spec):
    """``mst::rowwise`` / ``mst::rowwise_backward``: a body (a :class:`BodySpec` string) and its chunk plan."""

    PREFIX: ClassVar[str] = "mst-rowwise:"

    body: str
    chunks: Chunks = Chunks()


@dataclass(frozen=True)
class HeadSpec(_Spec):
    """``mst::linear_ce``: the head's whole contract (NOTE [body spec]). Per chunk ``z = linear(h, w, b)``,
    ``logits = pre(z)``, ``cross_entropy(post(logits), labels)``; ``pre`` and ``post`` are body spec strings."""

    PREFIX: ClassVar[str] = "mst-head:"

    pre: str
    post: str
    ignore_index: int = -100
    label_smoothing: float = 0.0
    chunks: Chunks = Chunks()
    needs: tuple = (True, True, True)  # the gradients w.r.t. h, w, b to compute (NOTE [gradient in forward])
    want_logits: bool = False  # the op also returns the logits (NOTE [returned logits])
    mean: bool = True  # reduction "mean" (over non-ignored labels), else "sum"


def amp_field(autocast) -> tuple:
    """``(device_type, torch.dtype)`` or None -> the spec's ``autocast`` field."""
    return (autocast[0], dtype_name(autocast[1])) if autocast else ()


def pickle_graph(gm: torch.fx.GraphModule) -> str:
    return base64.b64encode(pickle.dumps(gm, protocol=4)).decode("ascii")


def unpickle_graph(text: str) -> torch.fx.GraphModule:
    return pickle.loads(base64.b64decode(text.encode("ascii")))


_S = typing.TypeVar("_S")


@functools.lru_cache(maxsize=None)
def parse(text: str, cls: type[_S] = BodySpec) -> _S:
    """The spec of kind ``cls`` a string argument of an op holds (once per distinct string)."""
    if not text.startswith(cls.PREFIX):
        raise ValueError(f"mst: {text[:60]!r} is not a {cls.__name__} (ops take {cls.__name__}.dumps() strings)")
    return _decode(cls, json.loads(text[len(cls.PREFIX) :]))


def _decode(cls, fields: dict):
    """JSON fields -> the frozen dataclass: nested specs rebuilt, lists back to tuples."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        v = fields.get(f.name)
        if isinstance(v, dict) and dataclasses.is_dataclass(hints[f.name]):
            fields[f.name] = _decode(hints[f.name], v)
        elif isinstance(v, list):
            fields[f.name] = tuple(v)
    return cls(**fields)
