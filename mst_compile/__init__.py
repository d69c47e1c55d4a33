"""mst: Mini-Sequence Transformer as a torch.compile backend.

``torch.compile(model, backend="mst")`` finds the MLP blocks and the vocabulary projection + cross-entropy in
any model's graph and runs them one mini-sequence of tokens at a time, recomputing in backward, so their
``tokens x intermediate`` and ``tokens x vocab`` tensors never exist whole.
"""

from __future__ import annotations

from . import ops as _ops  # noqa: F401  (registers the mst:: custom ops)
from .backend import mst_backend
from .config import MSTConfig, config_context, get_config, set_config
from .explain import Explanation, explain
from .report import Region, Report, counters, last_report, reports, reset_counters


__all__ = [
    "Explanation",
    "MSTConfig",
    "explain",
    "Region",
    "Report",
    "config_context",
    "counters",
    "get_config",
    "last_report",
    "mst_backend",
    "reports",
    "reset_counters",
    "set_config",
]
__version__ = "0.1.0"


def _log_level_from_env() -> None:
    """``MST_LOG=info`` (one report per compiled graph) or ``debug`` (graphs after each pass) to stderr."""
    import logging
    import os

    level = os.environ.get("MST_LOG", "").upper()
    if level:
        log = logging.getLogger("mst_compile")
        log.setLevel(getattr(logging, level, logging.INFO))
        if not log.handlers:
            log.addHandler(logging.StreamHandler())


_log_level_from_env()
