"""Runs at ``import torch`` (entry point group ``torch.backends``); must be cheap and must never raise.

- registers ``TORCH_LOGS=mst`` for the ``mst_compile`` logger (before torch parses ``TORCH_LOGS``), and keeps
  the level ``MST_LOG`` or the user's ``setLevel`` gave that logger through torch's log setup (NOTE [log level]);
- with ``MST_INDUCTOR_PASS=1``, installs mst as an Inductor pre-grad pass, so that code compiling with the
  plain ``inductor`` backend (HF Trainer's ``torch_compile_backend="inductor"``, accelerate) gets the MLP and
  loss-only head rewrites without importing mst_compile (see ``inductor_pass.py``).

Its two ``torch._logging`` imports are the package's only private torch imports outside ``_compat.py``: this
module runs while ``import torch`` is still under way, before ``_compat``'s Dynamo and Inductor imports can load.
"""

from __future__ import annotations

import logging
import os

LOGGER = "mst_compile"

# NOTE [log level]: right after the backends load, ``import torch`` runs its log setup (``_init_logs``, again
# on every ``torch._logging.set_logs``): every registered logger, ``mst_compile`` included, is reset to NOTSET
# (so WARNING, from the root), made non-propagating and given torch's own stderr handler. A level set before
# that, by ``MST_LOG`` when ``mst_compile`` was imported or by ``logging.getLogger("mst_compile").setLevel``
# before ``import torch``, would be lost. The setup is wrapped: after it, a logger torch left at NOTSET (that
# is, ``TORCH_LOGS`` did not name ``mst``) gets ``MST_LOG``'s level, else the level it had before ``import
# torch``; the handler ``MST_LOG`` added is dropped there, since torch's prints the same lines.


def env_level() -> int | None:
    """The level ``MST_LOG`` asks for (``info``, ``debug``, ``warning``, a number), ``None`` when unset."""
    value = os.environ.get("MST_LOG", "").strip()
    if not value:
        return None
    if value.isdigit():
        return int(value)
    level = logging.getLevelName(value.upper())
    return level if isinstance(level, int) else logging.INFO


def apply_env_level() -> None:
    """``MST_LOG`` on the ``mst_compile`` logger, with a stderr handler of its own until torch's replaces it."""
    level = env_level()
    if level is None:
        return
    log = logging.getLogger(LOGGER)
    log.setLevel(level)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler._mst_env_handler = True  # removed once torch's log setup gives the logger its own handler
        log.addHandler(handler)


def _keep_level(init_logs, level_before: int):
    def init_logs_keeping_mst_level(*args, **kwargs):
        init_logs(*args, **kwargs)
        log = logging.getLogger(LOGGER)
        if log.level == logging.NOTSET:  # TORCH_LOGS did not set one
            level = env_level() or level_before
            if level:
                log.setLevel(level)
        if any(not getattr(h, "_mst_env_handler", False) for h in log.handlers):
            for h in [h for h in log.handlers if getattr(h, "_mst_env_handler", False)]:
                log.removeHandler(h)

    init_logs_keeping_mst_level._mst_wrapped = True
    return init_logs_keeping_mst_level


def _register_log() -> None:
    import torch._logging as torch_logging
    from torch._logging import _internal

    _internal.register_log("mst", LOGGER)
    if getattr(_internal._init_logs, "_mst_wrapped", False):
        return
    wrapped = _keep_level(_internal._init_logs, logging.getLogger(LOGGER).level)
    _internal._init_logs = wrapped  # set_logs() calls it by this name
    torch_logging._init_logs = wrapped  # import torch calls it by this one


def autoload() -> None:
    try:
        _register_log()
    except Exception:  # noqa: BLE001 - never break `import torch`
        pass
    if os.environ.get("MST_INDUCTOR_PASS", "").lower() in ("1", "true", "on", "yes"):
        try:
            from .inductor_pass import install

            install()
        except Exception as e:  # noqa: BLE001
            import warnings

            warnings.warn(f"mst: MST_INDUCTOR_PASS is set but the Inductor pass could not be installed: {e}")
