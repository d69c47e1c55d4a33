"""Optional dependencies of the benchmark, the examples and the command line: one clear line when one is missing.

``transformers`` (the benchmark's models) and ``matplotlib`` (its plot) come with the ``bench`` extra, the one
the README's benchmark command installs.
"""

from __future__ import annotations

import importlib


def install_hint(module: str, extra: str = "bench") -> str:
    return f'{module} is not installed: pip install -e ".[{extra}]" (the {extra} extra) or pip install {module}'


def optional(module: str):
    """``module`` imported, or ``None`` when it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def require(module: str, purpose: str, extra: str = "bench"):
    """``module`` imported; for a command line: exits with one line naming the extra when it is missing."""
    mod = optional(module)
    if mod is None:
        raise SystemExit(f"{purpose} needs {install_hint(module, extra)}")
    return mod
