"""The chunked custom ops (``torch.ops.mst.*``); importing this package registers them."""

import contextlib

from . import linear_ce, registry, rowwise  # noqa: F401


@contextlib.contextmanager
def fresh_compiled_bodies():
    """Inside, chunk bodies compile afresh (NOTE [compiled bodies]): the process's compiled bodies (the failed ones
    included) are set aside and put back on exit. For measurements of a body's first use (the GPU check:
    each row compiles what it runs; chunk cost: kernels built with the profiler's records)."""
    saved = dict(registry._COMPILED)  # NOTE [one compiled-body cache]
    registry._COMPILED.clear()
    try:
        yield
    finally:
        registry._COMPILED.clear()
        registry._COMPILED.update(saved)
