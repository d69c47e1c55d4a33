"""mst as an Inductor pre-grad custom pass, for callers that can only choose ``backend="inductor"``.

``mst_compile.inductor_pass.install()`` (or ``MST_INDUCTOR_PASS=1`` in the environment, picked up at
``import torch``) sets ``torch._inductor.config.pre_grad_custom_pass``. Inductor then runs the mst passes on
the same torch-level graph the ``mst`` backend sees, before AOTAutograd.

NOTE [inductor-pass mode]: a pass cannot wrap the compiled function's outputs, so the returned-logits bridge
(NOTE [returned logits]) is unavailable here: a head whose logits are also returned is left alone (the MLPs
are still chunked). Use ``backend="mst"`` (for HF Trainer: ``Trainer(model=torch.compile(model,
backend="mst"))``) for the full saving.
"""

from __future__ import annotations

import itertools
import warnings

import torch

from . import _compat
from .config import get_config
from .passes import PassContext, copy_graph_module, run_passes
from .report import Report, add_report


class MSTPreGradPass(_compat.CustomGraphPass):
    """NOTE [inductor-pass mode, copy then swap]: the passes rewrite a copy of Inductor's graph; only a rewrite
    that finished is moved into the graph object Inductor holds (it keeps using that object), so a failure in
    any pass leaves Inductor's graph exactly as it was, with one warning, as the backend's fallback does."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        gm = graph.owning_module
        cfg = get_config()
        if not cfg.enabled:
            return
        ctx = PassContext(cfg, torch.is_grad_enabled(), allow_logits_output=False)
        report = Report(graph=f"inductor-pass graph {next(_graph_ids)} ({len(graph.nodes)} nodes)")
        try:
            new = run_passes(copy_graph_module(gm), ctx)
        except Exception as e:  # noqa: BLE001 - a bug in a rewrite must never break the user's compile
            report.fallback = f"rewrite failed: {type(e).__name__}: {e}"
            warnings.warn(f"mst: {report.fallback}; this graph is compiled as Inductor would", stacklevel=2)
            new = None
        report.regions = ctx.regions
        if new is not None and report.rewritten():
            _swap_in(gm, new)
        add_report(report)

    def uuid(self):
        from .passes import dynamo_modules, shared

        return shared.source_hash(*dynamo_modules()) + repr(get_config())


_graph_ids = itertools.count(1)


def _swap_in(gm: torch.fx.GraphModule, new: torch.fx.GraphModule) -> None:
    """Replace the nodes of ``gm.graph`` (the same object) by those of ``new.graph``, and its nested bodies."""
    graph = gm.graph
    # the placeholders stay: AOTAutograd reads Dynamo's ``_dynamo_source`` attribute off them (a Python attribute
    # of the node, which a copied node does not carry); the passes add or remove no graph input
    old_inputs = [n for n in graph.nodes if n.op == "placeholder"]
    new_inputs = [n for n in new.graph.nodes if n.op == "placeholder"]
    if len(old_inputs) != len(new_inputs):
        raise RuntimeError(f"mst: the rewritten graph has {len(new_inputs)} inputs, Inductor's {len(old_inputs)}")
    for n in reversed(list(graph.nodes)):
        if n.op != "placeholder":
            graph.erase_node(n)
    graph.output(graph.graph_copy(new.graph, dict(zip(new_inputs, old_inputs))))
    for name, sub in new.named_children():
        if isinstance(sub, torch.fx.GraphModule):
            setattr(gm, name, sub)
    gm.recompile()


def install() -> None:
    """Add mst's pass to Inductor's ``pre_grad_custom_pass`` slot, after any pass already there
    (NOTE [chained passes])."""
    from .backend import chain_passes

    cfg = _compat.inductor_config()
    if not any(isinstance(p, MSTPreGradPass) for p in _compat.custom_graph_passes(cfg.pre_grad_custom_pass)):
        cfg.pre_grad_custom_pass = chain_passes(cfg.pre_grad_custom_pass, MSTPreGradPass())
    # NOTE [early timing]: the pass runs on every compile, before Inductor's cache lookup, so every compile
    # records its report and the cache is keyed on the rewritten graph (its body specs, NOTE [body spec]); a hit
    # needs nothing from the pass (the graph carries its bodies).
    if hasattr(cfg, "pre_grad_pass_timing"):  # torch 2.11 has no such setting (nor the cache lookup before it)
        cfg.pre_grad_pass_timing = "early"


def uninstall() -> None:
    """Remove mst's pass; passes others installed stay."""
    cfg = _compat.inductor_config()
    rest = tuple(p for p in _compat.custom_graph_passes(cfg.pre_grad_custom_pass) if not isinstance(p, MSTPreGradPass))
    cfg.pre_grad_custom_pass = _compat.slot_value(rest) if rest else None
