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

import torch

from . import _compat
from .config import get_config
from .passes import PassContext, run_passes
from .report import Report, add_report


class MSTPreGradPass(_compat.CustomGraphPass):
    def __call__(self, graph: torch.fx.Graph) -> None:
        gm = graph.owning_module
        cfg = get_config()
        if not cfg.enabled:
            return
        ctx = PassContext(cfg, torch.is_grad_enabled(), allow_logits_output=False)
        report = Report(graph=f"inductor-pass graph#{len(graph.nodes)}nodes")
        # In place: Inductor keeps using this graph object (and its nodes' Dynamo attributes). Every region is
        # checked before the graph is touched, so a CantChunk or a bug in a check leaves its region as it was.
        run_passes(gm, ctx)
        report.regions = ctx.regions
        add_report(report)

    def uuid(self):
        from . import passes

        src = passes.common.source_hash(passes.head_ce, passes.mlp, passes.normalize, passes.common)
        return src + repr(get_config())


def install() -> None:
    cfg = _compat.inductor_config()
    cfg.pre_grad_custom_pass = MSTPreGradPass()
    # NOTE [early timing]: the pass must run on every compile, before Inductor's cache lookup: its chunk bodies
    # live in this process's registry, which a cache hit from another process would find empty.
    cfg.pre_grad_pass_timing = "early"


def uninstall() -> None:
    _compat.inductor_config().pre_grad_custom_pass = None
