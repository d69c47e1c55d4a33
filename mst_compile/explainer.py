"""``mst_compile.explain(model, *args, **kwargs)``: what the backend would do to one call, without training.

Traces the call with Dynamo, runs the mst passes on every graph (no Inductor, no backward) and returns the
reports: every candidate region with its shapes, whether it was rewritten, its chunk count, the estimated
bytes no longer alive at once, and the reason for each skip.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import MSTConfig, resolve
from .passes import PassContext, copy_graph_module, run_passes
from .report import Report, plural


@dataclass
class Explanation:
    reports: list[Report] = field(default_factory=list)

    @property
    def regions(self):
        return [r for rep in self.reports for r in rep.regions]

    def bytes_saved(self) -> int:
        return sum(r.bytes_saved for r in self.regions if r.status == "rewritten")

    def __str__(self) -> str:
        lines = [f"mst explain: {plural(len(self.reports), 'graph')}, "
                 f"{plural(sum(r.status == 'rewritten' for r in self.regions), 'region')} rewritten, "
                 f"est. {self.bytes_saved() / 2**20:.1f} MiB saved (intermediates no longer alive at once)"]  # fmt: skip
        for rep in self.reports:
            lines.append(str(rep).removeprefix("mst: "))
            if not rep.regions:
                lines.append("  (no candidate regions)")
        return "\n".join(lines)


def explain(model, *args, options: dict | MSTConfig | None = None, **kwargs) -> Explanation:
    """Explain what ``torch.compile(model, backend="mst", options=options)`` would rewrite for this call."""
    cfg = resolve(options)
    out = Explanation()

    def backend(gm, example_inputs):
        ctx = PassContext(cfg, torch.is_grad_enabled())
        run_passes(copy_graph_module(gm), ctx)
        out.reports.append(Report(f"{len(gm.graph.nodes)} nodes", ctx.regions, index=len(out.reports) + 1))
        return gm.forward

    # No torch._dynamo.reset(): that would drop every other compiled model's code too. Dynamo guards each cached
    # graph on the backend that compiled it, so this backend traces afresh and the user's graphs stay.
    torch.compile(model, backend=backend)(*args, **kwargs)
    return out
