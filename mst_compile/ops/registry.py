"""Registry of the per-chunk bodies that the chunked ops run, keyed by their spec string.

The custom ops are opaque to Inductor and take only tensors and plain values, so the per-chunk math (an
``fx.GraphModule`` cut out of the user's graph) is named by a :class:`~.spec.BodySpec` string that the op
receives (NOTE [body spec]). The registry is a cache of ready bodies: a spec it has not seen (the graph was
compiled in another process) is rebuilt from the spec on first use. NOTE [content-addressed keys]: the key is
the body's content, never a counter, so two processes that produce the same graph agree on what each key means.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from .. import _compat
from . import entry
from .spec import BodySpec, amp_field, dtype_name, parse, pickle_graph, unpickle_graph

log = logging.getLogger("mst_compile")
_BODIES: dict[str, "Body"] = {}


def _ops_version() -> str:
    """A hash of the ops' own source. NOTE [cache keys]: the keys are string constants in the compiled graph, so
    Inductor's on-disk caches key on them; a changed op (a fake kernel's strides, say) must not meet code
    compiled against the old one."""
    h = hashlib.sha1()
    for f in sorted(os.listdir(os.path.dirname(__file__))):
        if f.endswith(".py"):
            with open(os.path.join(os.path.dirname(__file__), f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()[:8]


VERSION = _ops_version()


@dataclass(frozen=True)
class Body:
    """A row-wise function ``fn(x_chunk, *params) -> out_chunk`` and what its output looks like."""

    fn: Callable[..., torch.Tensor]
    out_features: int
    out_dtype: torch.dtype | None  # None: same dtype as the input
    code: str
    cast_only: bool = False  # the body only converts dtype (or is the identity): ops may take a fused path
    # NOTE [exit projection]: when >= 0, ``fn`` stops before the region's final projection and the op applies
    # ``linear(fn(x, *params), params[exit_w], params[exit_b])`` itself. Backward then needs no recompute of
    # that GEMM: its weight gradient and input gradient come straight from the incoming gradient.
    exit_w: int = -1
    exit_b: int = -1
    # NOTE [autocast]: ``(device_type, dtype)`` when the region ran under autocast in the user's graph. The op is
    # opaque to autocast, so it re-enters the same autocast around the body (forward and recompute).
    autocast: tuple | None = None
    # NOTE [compiled bodies]: when set, the op runs ``fn`` through Inductor's ``compile_fx`` (the row dimension
    # dynamic: one compile serves the full chunks and the ragged tail, and every layer with the same body), so
    # the row-wise middle (activation, gating, biases) is one fused kernel per chunk instead of one kernel per
    # op; the loop, the GEMM issued for the exit projection and the in-place weight-gradient accumulation stay
    # the op's (NOTE [opaque chunk loops]). A compile or run failure falls back to ``fn`` with one warning.
    compiled: bool = False
    kind: str = ""  # the spec's kind (``mlp``, ``post``, ...): the compiled bodies are counted by it

    def run(self, *args, rows: int = 1):
        """``fn(*args)``, compiled when the body says so (NOTE [compiled bodies]); the first ``rows`` arguments
        are row-indexed (a chunk's rows, and for a loss its labels)."""
        return self._run(self.fn, self.code, list(args), rows)

    def _run(self, fn, code: str, args: list, rows: int):
        """``fn(*args)``; compiled, the first ``rows`` arguments row-indexed (their dimension 0 a symbol)."""
        if self.compiled and args[0].shape[0] > 1:
            key = _body_key(self.kind, code, args)
            compiled = cached_compile(key, lambda: _boxed(compile_body(fn, args, rows_args=tuple(range(rows)))),
                                      "a chunk body could not be compiled, running it op by op")  # fmt: skip
            if compiled is not None:
                try:
                    return compiled(*args)
                except Exception as e:  # noqa: BLE001 - a missed fusion, never a failed step
                    compile_failed(key, "a compiled chunk body failed to run, running it op by op", e)
        return fn(*args)

    @functools.cached_property
    def entries(self) -> entry.Entries | None:
        """The body split at its entry projections (NOTE [entry projections]); ``None`` where it does not split."""
        return entry.split(self.fn) if isinstance(self.fn, torch.fx.GraphModule) else None

    def middle(self, es: list, *params):
        """The body after its entry projections, on their outputs ``es``, under the region's autocast."""
        with self.amp():
            return self._run(self.entries.middle, self.code + "\n# middle", [*es, *params], len(es))

    def amp(self):
        """The region's autocast state, set explicitly: entered when the region ran under autocast, and turned
        off when it did not but the caller's autocast is on (a region under ``autocast(enabled=False)`` inside
        an autocast block must not pick up the outer one: the op runs inside the caller's autocast)."""
        if self.autocast:
            return torch.autocast(self.autocast[0], self.autocast[1])
        return no_autocast()

    def inner(self, x, *params):
        """The body up to (not including) the exit projection, under the region's autocast."""
        with self.amp():
            return self.run(x, *params)

    def _exit(self, params) -> tuple:
        """The exit projection's weight and bias (NOTE [exit projection])."""
        return params[self.exit_w], params[self.exit_b] if self.exit_b >= 0 else None

    def __call__(self, x, *params):
        with self.amp():
            out = self.run(x, *params)
            if self.exit_w >= 0:
                out = torch.nn.functional.linear(out, *self._exit(params))
        return out

    def write(self, rows: torch.Tensor, x, *params, es: list | None = None) -> None:
        """``rows.copy_(self(x, *params))``, with the exit projection's GEMM writing into ``rows`` itself when the
        dtypes agree (``mm`` / ``addmm`` with ``out=``, the kernels ``linear`` calls: the same values, no
        chunk-sized temporary and copy; outside autocast, which takes no ``out=``). ``es``: the entry
        projections' outputs, already made by the op (NOTE [entry projections]): only the middle runs here."""
        out = self.inner(x, *params) if es is None else self.middle(es, *params)
        if self.exit_w >= 0:
            w, b = self._exit(params)
            if rows.is_contiguous() and rows.dtype == out.dtype == w.dtype and (b is None or b.dtype == w.dtype):
                entry.linear(out, w, b, out=rows)
                return
            with self.amp():
                out = torch.nn.functional.linear(out, w, b)
        rows.copy_(out)


# NOTE [one cast per call]: autocast keeps the low-precision copies of the weights it casts (leaves that require
# grad) until its outermost context exits. A chunk body enters its region's autocast once per chunk; with no
# autocast context around the loop (a region whose autocast Dynamo traced into the graph), every chunk's exit
# cleared that cache and the next chunk cast every weight again: a read of each fp32 weight and a write of its
# copy per chunk. The chunk loops therefore hold an autocast context, turned off, on their device for the whole
# loop, so each weight is cast once per op call, as the whole region casts it once per step.


def no_autocast(device_type: str | None = None) -> contextlib.ExitStack:
    """Turn off the caller's autocast (the ops run inside it, opaque to it): the chunk loops cast explicitly to
    their region's compute dtype (NOTE [autocast]), and a region that ran without autocast must not get one.
    ``device_type``: a chunk loop's device, where an autocast context is held even when none is on (NOTE [one
    cast per call])."""
    stack = contextlib.ExitStack()
    for device in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device) or device == device_type:
            stack.enter_context(torch.autocast(device, enabled=False))
    return stack


# NOTE [one compiled-body cache]: every compiled body of the process (a row-wise body per grad mode, autocast and
# input signature; a chunk cross-entropy per dtype, vocabulary and loss settings) lives in ``_COMPILED``, keyed by
# what it serves, the row count a symbol. ``None`` marks a key whose compile or run failed: it runs op by op from
# then on, and is not compiled again (one warning, ``counters["bodies_not_compiled"]``).
_COMPILED: dict[tuple, Callable | None] = {}


def body_not_compiled(what: str, e: BaseException | None = None) -> None:
    """A compiled body (NOTE [compiled bodies]) that failed to compile or run, or could not be compiled then: one
    warning, and ``counters["bodies_not_compiled"]`` (the GPU check reports it: a torch whose Inductor rejects a
    body runs it op by op, and its timings are of that)."""
    from ..report import counters

    counters["bodies_not_compiled"] += 1
    if e is None:
        log.warning("mst: %s", what)
    else:
        log.warning("mst: %s: %s: %s", what, type(e).__name__, e)


def compile_body(gm, args: list, rows_args: tuple[int, ...]) -> Callable:
    """A body's graph through Inductor, the arguments ``rows_args`` row-indexed (NOTE [compiled bodies]);
    ``counters["bodies_compiled"]`` counts the compiles (the GPU check asserts the bodies it runs compiled)."""
    from ..report import counters

    compiled = _compat.compile_fx_rows_dynamic(gm, args, rows_args=rows_args)
    counters["bodies_compiled"] += 1
    return compiled


def cached_compile(key: tuple, make: Callable[[], Callable], what: str) -> Callable | None:
    """The compiled body for ``key`` (NOTE [one compiled-body cache]): ``make()`` on first use; ``None`` when it
    failed, now or before (``what`` says what failed, in the warning)."""
    if key not in _COMPILED:
        if _capturing():  # NOTE [no compile in a capture]
            body_not_compiled(f"{what}: first met inside a CUDA graph capture, it runs op by op there")
            return None
        try:
            _COMPILED[key] = make()
        except Exception as e:  # noqa: BLE001 - a missed fusion, never a failed step
            compile_failed(key, what, e)
    return _COMPILED[key]


# NOTE [no compile in a capture]: a body first met while a CUDA graph is being captured is not compiled there
# (a compile may load modules, autotune and synchronize, which a capture forbids): that call runs op by op, and
# the key stays free for a later call outside the capture. It does not happen when each body ran in the warm-up
# (CUDA graphs record on a later call) with the same key, which NOTE [Dynamo's graph metadata] and the key's
# grad-mode rule (:func:`_body_key`) keep so.


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def compile_failed(key: tuple, what: str, e: BaseException) -> None:
    """The compiled body for ``key`` failed (to compile or to run): op by op from now on."""
    _COMPILED[key] = None
    body_not_compiled(what, e)


def _body_key(kind: str, code: str, args: list) -> tuple:
    """What one compiled row-wise body serves (Inductor's ``compile_fx`` on the body's graph, no Dynamo: the op
    runs inside compiled code, where Dynamo does not trace): its code, grad mode, autocast, and its inputs'
    dtypes, devices, row shapes and which need a gradient; shared by every chunk size and by the same body in
    every layer. The kind comes first (:func:`compiled_kinds`). Which inputs need a gradient counts only under
    grad mode: a forward without it compiles the same code either way (and under CUDA graphs the inputs it
    records with may be copies that need none, NOTE [no compile in a capture])."""
    x = args[0]
    amp = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
    grad = torch.is_grad_enabled()
    return (kind, code, grad, amp,
            tuple((tuple(a.shape[1:]), a.dtype, a.device.type, grad and a.requires_grad) for a in args))  # fmt: skip


def compiled_kinds() -> collections.Counter:
    """How many compiled bodies of each kind the process holds and runs (NOTE [one compiled-body cache]): the
    first field of their keys, ``cross_entropy`` for the head's chunk cross-entropy; failed ones not counted."""
    return collections.Counter(key[0] for key, fn in _COMPILED.items() if fn is not None)


def _boxed(compiled: Callable) -> Callable:
    """``compile_fx`` returns the outputs boxed: one output unboxed, several as a tuple."""

    def fn(*a):
        out = compiled(*a)
        if isinstance(out, (list, tuple)):
            return out[0] if len(out) == 1 else tuple(out)
        return out

    return fn


def register(
    kind: str, gm: torch.fx.GraphModule, out_features: int, out_dtype: torch.dtype | None, exit_w=-1, exit_b=-1,
    autocast=None, compiled: bool = False,
) -> str:  # fmt: skip
    """Register ``gm`` as a body; returns its spec string (NOTE [body spec]), which the op receives."""
    # the body's nodes were copied from the user's graph with their metadata: its fake values would keep that
    # compile's FakeTensorMode (and every fake tensor of it) alive as long as the registry holds the body
    for i, n in enumerate(gm.graph.nodes):
        n.meta = {}
        if n.op not in ("placeholder", "output"):
            n.name = f"t{i}"  # canonical names: the same body in every layer has the same code, so one key
    gm.recompile()
    spec = BodySpec(kind, VERSION, out_features, dtype_name(out_dtype), exit_w, exit_b, amp_field(autocast), compiled,
                    graph=pickle_graph(gm))  # fmt: skip
    return _add(spec, lambda: Body(gm, out_features, out_dtype, gm.code, exit_w=exit_w, exit_b=exit_b,
                                   autocast=autocast, compiled=compiled, kind=kind))  # fmt: skip


def _add(spec: BodySpec, make: Callable[[], Body]) -> str:
    text = spec.dumps()
    if text not in _BODIES:
        _BODIES[text] = make()
    return text


def get(key: str) -> Body:
    """The body a spec string names: registered in this process, else rebuilt from the spec (NOTE [body spec])."""
    body = _BODIES.get(key)
    if body is None:
        body = _BODIES[key] = _build(parse(key), key)
        log.debug("mst: rebuilt chunk body %s (%s) from its spec", parse(key).digest(), parse(key).kind)
    return body


def _build(spec: BodySpec, text: str) -> Body:
    if spec.version != VERSION:
        raise RuntimeError(f"mst: a chunk body of mst ops version {spec.version}, these ops are {VERSION}: the "
                           "compiled graph is stale. Clear the compile caches and compile again.")  # fmt: skip
    if spec.graph:
        fn = unpickle_graph(spec.graph)
        code = fn.code
    elif spec.kind == "cast":
        dtype = spec.dtype
        fn, code = (lambda z: z.to(dtype)), text
    elif spec.kind == "logits":
        pre = get(spec.pre).fn

        def fn(hc, w, b=None):
            return pre(torch.nn.functional.linear(hc, w, b))

        code = text
    else:
        raise RuntimeError(
            f"mst: chunk body {spec.kind}:{spec.name or spec.digest()} is a Python function registered in another "
            "process (registry.register_fn) and cannot be rebuilt here; register it in this process first."
        )
    return Body(fn, spec.out_features, spec.dtype, code, cast_only=spec.cast_only, exit_w=spec.exit_w,
                exit_b=spec.exit_b, autocast=spec.amp, compiled=spec.compiled, kind=spec.kind)  # fmt: skip


def register_fn(
    kind: str, name: str, fn: Callable, out_features: int = -1, out_dtype=None, exit_w=-1, exit_b=-1, autocast=None
) -> str:
    """Register a plain Python function as a body named ``name`` (tests, tools): its spec runs only in this
    process (NOTE [body spec])."""
    spec = BodySpec(kind, VERSION, out_features, dtype_name(out_dtype), exit_w, exit_b, amp_field(autocast), name=name)
    text = spec.dumps()
    _BODIES[text] = Body(fn, out_features, out_dtype, name, exit_w=exit_w, exit_b=exit_b, autocast=autocast,
                         kind=kind)  # fmt: skip
    return text


def register_cast(dtype: torch.dtype, autocast=None, compiled: bool = False) -> str:
    """The body ``z -> z.to(dtype)`` (the identity when ``z`` already has that dtype). ``compiled`` on the head's
    loss-side cast: the op may run each chunk's cross-entropy as Inductor code (NOTE [compiled bodies])."""
    spec = BodySpec("cast", VERSION, -1, dtype_name(dtype), autocast=amp_field(autocast), compiled=compiled,
                    cast_only=True)  # fmt: skip
    return _add(spec, lambda: _build(spec, spec.dumps()))


def register_logits(pre: str, vocab: int, dtype: torch.dtype) -> str:
    """The head's logits as a row-wise body ``(h, w[, b]) -> pre(linear(h, w, b))``, for the logits rebuild's
    backward (NOTE [returned logits]); ``pre`` is the head's pre body spec."""
    spec = BodySpec("logits", VERSION, vocab, dtype_name(dtype), autocast=parse(pre).autocast, pre=pre)
    return _add(spec, lambda: _build(spec, spec.dumps()))
