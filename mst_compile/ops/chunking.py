"""How a flat token dimension is cut into mini-sequences."""

from __future__ import annotations

import math
from dataclasses import dataclass


def num_chunks_for(rows: int, num_chunks: int, chunk_rows: int) -> int:
    """The chunk count for ``rows`` tokens.

    - ``num_chunks > 0`` and ``chunk_rows > 0``: ``num_chunks``, but no chunk under ``chunk_rows`` rows
      (the automatic policy: a chunk must stay large enough for its GEMMs to outweigh the per-chunk
      weight-gradient update, which touches the whole weight);
    - only ``num_chunks``: exactly that many; only ``chunk_rows``: ``ceil(rows / chunk_rows)``.

    Always in ``[1, max(rows, 1)]``: fewer tokens than chunks gives one token per chunk.
    """
    if num_chunks > 0 and chunk_rows > 0:
        m = min(num_chunks, rows // chunk_rows)
    elif num_chunks > 0:
        m = num_chunks
    elif chunk_rows > 0:
        m = math.ceil(rows / chunk_rows)
    else:
        m = 1
    return max(1, min(m, max(rows, 1)))


def chunk_bounds(rows: int, num_chunks: int, chunk_rows: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(rows)``; all chunks equal but the last, which may be short."""
    m = num_chunks_for(rows, num_chunks, chunk_rows)
    size = max(1, math.ceil(rows / m))
    return [(s, min(s + size, rows)) for s in range(0, rows, size)]


@dataclass(frozen=True)
class Chunks:
    """A chunk plan as an op receives it (in its spec, NOTE [body spec]): the count is decided per call from the
    row count, so one compiled graph serves every length (see :func:`num_chunks_for`)."""

    num_chunks: int = 1
    chunk_rows: int = 0

    def bounds(self, rows: int) -> list[tuple[int, int]]:
        return chunk_bounds(rows, self.num_chunks, self.chunk_rows)
