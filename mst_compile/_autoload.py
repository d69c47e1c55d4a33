"""Runs at ``import torch`` (entry point group ``torch.backends``); must be cheap and must never raise.

- registers ``TORCH_LOGS=mst`` for the ``mst_compile`` logger (before torch parses ``TORCH_LOGS``);
- with ``MST_INDUCTOR_PASS=1``, installs mst as an Inductor pre-grad pass, so that code compiling with the
  plain ``inductor`` backend (HF Trainer's ``torch_compile_backend="inductor"``, accelerate) gets the MLP and
  loss-only head rewrites without importing mst_compile (see ``inductor_pass.py``).
"""

from __future__ import annotations

import os


def autoload() -> None:
    try:
        from torch._logging._internal import register_log

        register_log("mst", "mst_compile")
    except Exception:  # noqa: BLE001 - never break `import torch`
        pass
    if os.environ.get("MST_INDUCTOR_PASS", "").lower() in ("1", "true", "on", "yes"):
        try:
            from .inductor_pass import install

            install()
        except Exception as e:  # noqa: BLE001
            import warnings

            warnings.warn(f"mst: MST_INDUCTOR_PASS is set but the Inductor pass could not be installed: {e}")
