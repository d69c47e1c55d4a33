"""The ``mst`` torch.compile backend: rewrite the Dynamo graph, then hand it to Inductor.

``torch.compile(model, backend="mst", options={...})`` reaches :func:`mst_backend` through the
``torch_dynamo_backends`` entry point, so no import of ``mst_compile`` is needed.
"""

from __future__ import annotations

import collections
import logging
import warnings

import torch
from torch import fx

from . import _compat, ops  # noqa: F401  (ops: registers the mst:: custom ops)
from .config import MSTConfig, resolve
from .logits import rebuild_outputs
from .passes import PassContext, copy_graph_module, run_passes
from .passes.aten.embedding_grad import EmbeddingGradPass
from .passes.aten.recompute import RecomputePass
from .passes.aten.remat import RematPass
from .recipes import warn_on_eager_checkpoints
from .report import Report, add_report

log = logging.getLogger("mst_compile")


# NOTE [buffer reuse]: mst's graphs compile with Inductor's buffer reuse off (``inductor=`` overrides it). Reuse
# keeps a dead buffer allocated for a later allocation of the same size when Inductor's estimate says the peak
# does not grow; that estimate cannot see the memory inside opaque ops (mst's chunk loops, the attention
# backward), so the extended lifetimes cross the real peak: the second layer's recomputed RoPE q and k buffers
# (2 x tokens x H) stayed allocated through its attention backward (llama-small, 4096 tokens: peak 213.6 -> 197.0
# MiB with reuse off).
# NOTE [horizontal fusion]: mst's graphs keep only producer-consumer fusion. Inductor fuses two kernels that read
# the same buffer even when no data flows between them, and places the fused kernel where the earlier one was;
# in a backward with recomputation that undoes the recomputation: the first layer's recomputed norm and RoPE
# (NOTE [second recompute]) were fused with the second layer's kernels at the top of the backward and their
# ``tokens x H`` outputs held through the second layer's backward; Inductor's guard against fusing distant
# kernels did not stop it (with the second recompute, HF checkpointing at 16384 tokens: 714 MiB with it, 447
# without).
_NO_HORIZONTAL_FUSION = 2**62


# NOTE [untouched graphs]: a graph in which mst chunks nothing (a short sequence whose regions each fit one
# chunk, NOTE [one chunk is whole]; a graph with no region at all) compiles as torch.compile would, but for two
# rewrites that never cost time or memory: the causal mask replaced by SDPA's own (NOTE [materialized causal
# mask]) and the tied-embedding gradient scatter (NOTE [tied embedding gradient]). The memory passes are the
# chunked graphs' policy: selective recompute and the second recompute trade time for the memory of
# ``tokens x H`` activations, and buffer reuse and horizontal fusion are off because of the opaque chunk loops
# (NOTE [buffer reuse], NOTE [horizontal fusion]). Installed on an untouched graph they only cost compile and
# step time (bf16, 64 tokens, nothing chunked: Gemma's compile 1.13x Inductor's, Llama's 1.10x).
REWRITTEN, UNTOUCHED, PLAIN = "rewritten", "untouched", "plain"


def _inductor(gm, example_inputs, cfg: MSTConfig, mode: str | None, passes: str = REWRITTEN):
    """Inductor's ``compile_fx`` with mst's Inductor passes installed: all of them on a rewritten graph
    (``passes=REWRITTEN``), only the free one on an untouched graph (NOTE [untouched graphs]), none when disabled
    (``PLAIN``: also the fallback after an Inductor failure). An Inductor option the user set is kept."""
    if cfg.compiler == "aot_eager":
        return _compat.lookup_backend("aot_eager")(gm, example_inputs)
    patches = _compat.inductor_mode_options(mode) if mode else {}
    patches.update(cfg.inductor)
    if passes != PLAIN and cfg.enabled:
        ours = {"post_grad_custom_post_pass": EmbeddingGradPass()}  # NOTE [tied embedding gradient]
        if passes == REWRITTEN and cfg.recompute != "none":
            ours["joint_custom_pre_pass"] = RecomputePass(cfg.recompute)  # NOTE [selective recompute]
            ours["post_grad_custom_pre_pass"] = RematPass()  # NOTE [second recompute]
        for slot, mine in ours.items():
            theirs = patches[slot] if slot in patches else getattr(_compat.inductor_config(), slot)
            patches[slot] = chain_passes(theirs, mine)
        if passes == REWRITTEN:
            patches.setdefault("allow_buffer_reuse", False)  # NOTE [buffer reuse]
            patches.setdefault("score_fusion_memory_threshold", _NO_HORIZONTAL_FUSION)  # NOTE [horizontal fusion]
    return _compat.compile_fx(gm, example_inputs, config_patches=patches or None)


def chain_passes(theirs, mine):
    """NOTE [chained passes]: an Inductor custom-pass slot holding the user's (or a framework's) passes and
    mst's, the user's first, so that installing mst never replaces a pass someone else set: globally in
    ``torch._inductor.config`` or in ``options={"inductor": {...}}``. Inductor runs a tuple in order and keys
    its cache on each pass's ``uuid`` (where a slot takes one pass, torch 2.11, one ``ChainedPass`` does both).
    Returns ``mine`` alone where the slot was empty."""
    before = tuple(p for p in _compat.custom_graph_passes(theirs) if p is not mine)
    return _compat.slot_value((*before, mine))


# NOTE [options fixed per compiled model]: the process default and the ``MST_*`` environment are read when a
# model's frame is first compiled; a recompile of it (a new shape, a guard that failed) uses the same settings,
# as the options passed to torch.compile are. Keyed by the frame, the options and the parameters the graph reads
# (two models of one class share their frames' code).
# Bounded: the oldest entries go first (a process that compiles many models keeps only the recent frames').
_FRAME_CONFIGS: collections.OrderedDict[tuple, MSTConfig] = collections.OrderedDict()
_FRAME_CONFIGS_MAX = 4096


def _config(options, example_inputs) -> MSTConfig:
    cid = _compat.compile_id()
    if cid is None:
        return resolve(options)
    frame, n = cid
    params = tuple(id(t) for t in example_inputs if isinstance(t, torch.nn.Parameter))
    key = (frame, repr(options), params)
    if n == 0 or key not in _FRAME_CONFIGS:  # a first compile (frame ids restart at torch._dynamo.reset())
        _FRAME_CONFIGS[key] = resolve(options)
        while len(_FRAME_CONFIGS) > _FRAME_CONFIGS_MAX:
            _FRAME_CONFIGS.popitem(last=False)
    _FRAME_CONFIGS.move_to_end(key)
    return _FRAME_CONFIGS[key]


def mst_backend(gm: fx.GraphModule, example_inputs, options: dict | MSTConfig | None = None, mode: str | None = None):
    """Dynamo backend: chunk the MLP and head regions of ``gm`` (see ``mst_compile.passes``), compile with Inductor."""
    cfg = _config(options, example_inputs)
    warn_on_eager_checkpoints()  # NOTE [checkpointed layer tracing]
    if not cfg.enabled:
        return _inductor(gm, example_inputs, cfg, mode)
    report = Report(graph=f"{len(gm.graph.nodes)} nodes")
    report.note_parameters(example_inputs)
    ctx = PassContext(cfg, torch.is_grad_enabled())
    try:
        with _compat.saved_tensor_hooks_deferred():  # the checks trace FakeTensors under autograd
            new_gm = run_passes(copy_graph_module(gm), ctx)
    except Exception as e:  # noqa: BLE001 - a bug in a rewrite must never break the user's model
        report.fallback = f"rewrite failed: {type(e).__name__}: {e}"
        new_gm = None
    report.regions = ctx.regions
    if new_gm is None or not report.rewritten():
        if report.fallback:
            warnings.warn(f"mst: {report.fallback}; compiling this graph with plain Inductor", stacklevel=2)
        add_report(report)
        return _inductor(gm, example_inputs, cfg, mode, passes=UNTOUCHED)  # NOTE [untouched graphs]
    _note_compile_mode()
    try:
        compiled = _inductor(new_gm, example_inputs, cfg, mode, passes=REWRITTEN if report.chunked() else UNTOUCHED)
    except _compat.restart_exceptions():
        raise  # Dynamo's own control flow, not a failure
    except Exception as e:  # noqa: BLE001
        report.fallback = f"Inductor failed on the rewritten graph: {type(e).__name__}: {e}"
        warnings.warn(f"mst: {report.fallback}; compiling this graph with plain Inductor", stacklevel=2)
        add_report(report)
        return _inductor(gm, example_inputs, cfg, mode, passes=PLAIN)
    add_report(report)
    run = compiled
    if ctx.logits_outputs:
        logits_outputs = ctx.logits_outputs

        def run(*args):
            return rebuild_outputs(compiled(*args), logits_outputs)

    if cfg.verify:  # NOTE [verify]
        from .verify import verifying

        return verifying(run, gm, cfg.verify, report)
    return run


mst_backend.__name__ = "mst"

_NOTED_MODES: set[str] = set()


def _note_compile_mode() -> None:
    """NOTE [out-of-process compile]: under ``TORCHINDUCTOR_FX_COMPILE_MODE=subprocess`` (or ``serialize``) Inductor
    pickles each graph with torch's graph pickler, which accepts only ``aten`` and ``fbgemm`` ops: a graph that
    calls ``torch.ops.mst.*`` is refused there and Inductor compiles it in this process instead (its own
    fallback). Said once per mode, so the user knows why."""
    fx_mode = _compat.fx_compile_mode()
    if fx_mode != "normal" and fx_mode not in _NOTED_MODES:
        _NOTED_MODES.add(fx_mode)
        log.warning("mst: TORCHINDUCTOR_FX_COMPILE_MODE=%s: torch's graph pickler sends only aten/fbgemm ops out of "
                    "process, so Inductor compiles mst's rewritten graphs (they call torch.ops.mst.*) in this process",
                    fx_mode)  # fmt: skip
