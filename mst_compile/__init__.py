"""mst: Mini-Sequence Transformer as a torch.compile backend.

``torch.compile(model, backend="mst")`` finds the MLP blocks and the vocabulary projection + cross-entropy in
any model's graph and runs them one mini-sequence of tokens at a time, recomputing in backward, so their
``tokens x intermediate`` and ``tokens x vocab`` tensors never exist whole.
"""

from __future__ import annotations

import importlib

from ._autoload import apply_env_level  # cheap: imports only logging and os

# NOTE [lazy package]: ``import torch`` imports this package through the ``torch.backends`` entry point
# (``_autoload``), so importing it must cost nothing: every name below loads its module on first use.
_LAZY = {
    "mst_backend": "backend", "MSTConfig": "config", "config_context": "config", "get_config": "config",
    "set_config": "config", "Explanation": "explainer", "explain": "explainer", "Region": "report", "Report": "report",
    "counters": "report", "last_report": "report", "reports": "report", "reset_counters": "report",
    "compile_per_layer": "recipes", "trace_checkpointed_layers": "recipes", "trace_checkpointed_moe": "recipes",
}  # fmt: skip
_SUBMODULES = ("backend", "bench", "config", "explainer", "inductor_pass", "logits", "ops", "passes", "recipes", "report")


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mst_compile' has no attribute {name!r}")


__all__ = sorted(_LAZY)
__version__ = "0.1.0"


# ``MST_LOG=info`` (one report per compiled graph) or ``debug`` (graphs after each pass) to stderr; kept through
# ``import torch``'s log setup (NOTE [log level] in ``_autoload.py``)
apply_env_level()
