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

import warnings

import torch

from . import _compat
from .config import get_config
from .passes import PassContext, copy_graph_module, run_passes
from .report import Report, add_report


class MSTPreGradPass(_compat.CustomGraphPass):
    def __call__(self, graph: torch.fx.Graph) -> None:
        gm = graph.owning_module
        cfg = get_config()
        if not cfg.enabled:
            return
        ctx = PassContext(cfg, None, torch.is_grad_enabled(), allow_logits_output=False)
        report = Report(graph=f"inductor-pass graph#{len(graph.nodes)}nodes")
        try:
            new = run_passes(copy_graph_module(gm), ctx)
        except Exception as e:  # noqa: BLE001 - a bug in a rewrite must never break the user's model
            report.fallback = f"rewrite failed: {type(e).__name__}: {e}"
            warnings.warn(f"mst: {report.fallback}; this graph is compiled by plain Inductor", stacklevel=2)
            add_report(report)
            return
        report.regions = ctx.regions
        if report.rewritten():
            # adopt the rewritten graph (and its rewritten subgraphs) in place
            graph.__init__(owning_module=gm)
            graph.output(graph.graph_copy(new.graph, {}))
            for name, sub in new.named_children():
                setattr(gm, name, sub)
            gm.recompile()
        add_report(report)

    def uuid(self):
        import hashlib
        import inspect

        from . import passes

        src = "".join(inspect.getsource(m) for m in (passes.head_ce, passes.mlp, passes.normalize, passes.common))
        return hashlib.sha1((src + repr(get_config())).encode()).hexdigest()


def install() -> None:
    _compat.inductor_config().pre_grad_custom_pass = MSTPreGradPass()


def uninstall() -> None:
    _compat.inductor_config().pre_grad_custom_pass = None
