"""The chunk plan: how many mini-sequences a chunked region runs. One function, :func:`chunk_plan`, serves the
MLP pass, the head pass, the benchmark's memory estimate and the report.

A region is described by what one token costs: ``input_size`` (the region's input row), ``wide_size`` (the
widened rows its first projections make, in the same unit: the MLP's gate and up, the head's fp32 logits) and
``row_bytes`` (the bytes of one token's intermediates that chunking bounds).

- Fixed settings (``num_chunks``, ``chunk_tokens``, ``chunk_memory_mib``) are taken as they are.
- Automatic, CPU (and any device but CUDA): NOTE [auto chunk count] and NOTE [minimum chunk] below, the policy
  the CPU measurements were made with.
- Automatic, CUDA: NOTE [CUDA chunk plan].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .ops.chunking import Chunks, num_chunks_for

# NOTE [auto chunk count]: one chunk's widened tensors about the size of the region's input:
# M = wide_size / input_size (the MLP: sum of widened widths / H; the head: fp32 logits / hidden states).
#
# NOTE [minimum chunk]: the automatic count is bounded below by a chunk size (``MIN_ROWS`` tokens), because every
# chunk of the head also adds its share into the whole weight gradient (V x H, read and written once per chunk):
# that traffic is fixed per chunk while the chunk's GEMM work shrinks with its tokens. Such a chunk's memory
# grows with the vocabulary (297 MiB of fp32 logits at V = 151936), so when its intermediate is over
# ``MIN_ROWS_MIB`` MiB the minimum drops toward that size, never below ``LOWEST_MIN_ROWS`` tokens (smaller chunks
# stay available through ``min_chunk_tokens`` or ``chunk_memory_mib``).
MIN_ROWS, LOWEST_MIN_ROWS, MIN_ROWS_MIB = 512, 256, 64

# NOTE [one chunk is whole]: an automatic plan of one chunk (a short sequence) leaves the region to Inductor
# (``ChunkPlan.whole``), on every device: one chunk bounds nothing, and the op would only add its recompute and,
# on the CPU, op-by-op bodies that Inductor fuses (Gemma bf16 at 256 tokens: a step 1.5-1.7x torch.compile's).
# Short sequences so compile as torch.compile would. A count the user fixed is kept, one chunk included.

# NOTE [chunking pays]: with low-precision weights, a run of several chunks keeps an fp32 accumulator per weight
# gradient (NOTE [weight-gradient accumulation]): 4 bytes per weight element that a whole region does not
# need. A region whose caller counts that cost (``fixed_bytes``, with ``whole_row_bytes``: what Inductor holds
# per token of the whole region) is chunked only when one chunk plus the accumulator is smaller than the whole
# region. The head counts it: its gradient-in-forward loop frees each chunk at once, so its intermediate is all
# it bounds (llama-small, bf16, 1024 tokens: 2 chunks of 512 made the step's peak 196 MiB against Inductor's
# 146). The MLP does not: its chunks also drop each layer's saved intermediates until backward, a saving one
# region's rows do not show.

# NOTE [CUDA chunk plan]: on a GPU the per-chunk weight-gradient update (V x H, or I x H, read and written per
# chunk) is memory-bound below ~1200 tokens on an H100, and GEMMs run best on row counts that are multiples of
# ``CUDA_ROW_MULTIPLE``. So chunks are as large as a budget allows (``CUDA_BUDGET_FRACTION`` of the device's
# memory per chunk's intermediate), never under ``CUDA_MIN_ROWS`` rows, rounded down to that multiple; a region
# whose whole intermediate fits the budget is one chunk, so not chunked at all (NOTE [one chunk is whole]).
# The constants are an estimate; the benchmark's ``gpu-check`` measures them.
CUDA_BUDGET_FRACTION, CUDA_MIN_ROWS, CUDA_ROW_MULTIPLE = 1 / 64, 1024, 128


ONE_CHUNK = "it fits one chunk (NOTE [one chunk is whole])"
NOT_PAYING = "chunking would save less than its fp32 gradient accumulator costs (NOTE [chunking pays])"


@dataclass(frozen=True)
class ChunkPlan:
    """What the chunked op is given (``chunks``, in its spec), how the report names it, and whether the region
    is better left whole."""

    chunks: Chunks
    label: str
    why: str = ""  # why the region is left whole; empty when it is chunked

    @property
    def whole(self) -> bool:
        return bool(self.why)

    def rows_in_first_chunk(self, tokens: int) -> int:
        start, stop = self.chunks.bounds(tokens)[0]
        return stop - start


def min_rows(cfg, row_bytes: int) -> int:
    """The automatic CPU policy's smallest chunk in tokens: ``min_chunk_tokens`` when set, else NOTE [minimum
    chunk]."""
    if cfg.min_chunk_tokens is not None:
        return cfg.min_chunk_tokens
    fit = MIN_ROWS_MIB * 2**20 // max(row_bytes, 1)
    return max(LOWEST_MIN_ROWS, min(MIN_ROWS, fit))


def cuda_budget(device_memory: int | None = None, device_index: int | None = None) -> float:
    """NOTE [CUDA chunk plan]: the bytes one chunk's intermediate may take on a GPU of ``device_memory`` bytes
    (default: the memory of CUDA device ``device_index``)."""
    if device_memory is None:
        import torch

        device_memory = torch.cuda.get_device_properties(device_index or 0).total_memory
    return device_memory * CUDA_BUDGET_FRACTION


def chunk_plan(cfg, *, rows: int | None, input_size: int, wide_size: int, row_bytes: int, device_type: str = "cpu",
               device_memory: int | None = None, device_index: int | None = None, fixed_bytes: int = 0,
               whole_row_bytes: int | None = None) -> ChunkPlan:  # fmt: skip
    """The plan for a region of ``rows`` tokens (``None`` when dynamic) under config ``cfg``; ``fixed_bytes``:
    what running several chunks costs whatever their count, ``whole_row_bytes``: what the region left whole
    holds per token (NOTE [chunking pays])."""
    row_bytes = max(int(row_bytes), 1)
    fixed = bool(cfg.num_chunks or cfg.chunk_tokens or cfg.chunk_memory_mib)
    if cfg.num_chunks:
        m, r, rule = cfg.num_chunks, 0, str(cfg.num_chunks)
    elif cfg.chunk_tokens:
        m, r, rule = 0, cfg.chunk_tokens, f"one per {cfg.chunk_tokens} tokens"
    elif cfg.chunk_memory_mib:
        r = max(1, int(cfg.chunk_memory_mib * 2**20 // row_bytes))
        m, rule = 0, f"one per {r} tokens (<= {cfg.chunk_memory_mib:g} MiB each)"
    elif device_type == "cuda":  # NOTE [CUDA chunk plan]
        budget = cuda_budget(device_memory, device_index)
        fit = int(budget // row_bytes) // CUDA_ROW_MULTIPLE * CUDA_ROW_MULTIPLE
        r = cfg.min_chunk_tokens or max(CUDA_MIN_ROWS, fit)
        m, rule = 0, f"one per {r} tokens (<= {budget / 2**20:.0f} MiB each)"
        if isinstance(rows, int) and rows * row_bytes <= budget and cfg.min_chunk_tokens is None:
            return ChunkPlan(Chunks(0, r), "1", why=ONE_CHUNK)
    else:
        auto = max(1, math.ceil(wide_size / max(input_size, 1)))
        r = min_rows(cfg, row_bytes)
        m, rule = auto, f"{auto}, >= {r} tokens each"
    if not isinstance(rows, int):
        return ChunkPlan(Chunks(m, r), rule)
    count = num_chunks_for(rows, m, r)
    plan = ChunkPlan(Chunks(m, r), str(count))
    if not fixed and count == 1:
        return ChunkPlan(Chunks(0, r), "1", why=ONE_CHUNK)
    if not fixed and fixed_bytes and whole_row_bytes is not None and (
        plan.rows_in_first_chunk(rows) * row_bytes + fixed_bytes >= rows * whole_row_bytes
    ):
        return ChunkPlan(Chunks(0, r), "1", why=NOT_PAYING)
    return plan
