"""The chunked custom ops (``torch.ops.mst.*``); importing this package registers them."""

from . import linear_ce, rowwise  # noqa: F401
