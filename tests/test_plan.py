"""The one chunk plan (``mst_compile.plan``): CPU policy, CUDA policy (detection only, no kernel), fixed options."""

import pytest
import torch

import mst_compile
from mst_compile.plan import CUDA_MIN_ROWS, chunk_plan
from tests.modules import LMHead

GIB = 2**30
LLAMA8B_HEAD = dict(input_size=4096 * 2, wide_size=128256 * 4, row_bytes=128256 * 4)  # bf16 h, fp32 logits
LLAMA8B_MLP = dict(input_size=4096, wide_size=2 * 14336, row_bytes=4 * 14336 * 2)


def test_cpu_policy_is_the_measured_one():
    cfg = mst_compile.MSTConfig()
    p = chunk_plan(cfg, rows=8192, input_size=512, wide_size=2 * 2048, row_bytes=4 * 2048 * 4)
    assert (p.chunks.num_chunks, p.chunks.chunk_rows, p.label, p.whole) == (8, 512, "8", False)
    p = chunk_plan(cfg, rows=8192, input_size=512 * 4, wide_size=32000 * 4, row_bytes=32000 * 4)
    assert p.label == "16" and p.rows_in_first_chunk(8192) == 512


@pytest.mark.parametrize("region", [LLAMA8B_HEAD, LLAMA8B_MLP], ids=["head", "mlp"])
def test_cuda_chunks_are_large_multiples_of_128(region):
    """NOTE [CUDA chunk plan] on an 80 GiB device: chunks of >= 1024 rows, a multiple of 128, under the budget."""
    cfg = mst_compile.MSTConfig()
    p = chunk_plan(cfg, rows=65536, device_type="cuda", device_memory=80 * GIB, **region)
    assert not p.whole and p.chunks.num_chunks == 0
    assert p.chunks.chunk_rows >= CUDA_MIN_ROWS and p.chunks.chunk_rows % 128 == 0
    assert p.chunks.chunk_rows * region["row_bytes"] <= 80 * GIB / 64 or p.chunks.chunk_rows == CUDA_MIN_ROWS
    assert int(p.label) == -(-65536 // p.chunks.chunk_rows)


def test_cuda_short_sequences_are_not_chunked():
    cfg = mst_compile.MSTConfig()
    p = chunk_plan(cfg, rows=1024, device_type="cuda", device_memory=80 * GIB, **LLAMA8B_MLP)
    assert p.whole  # 112 MiB of intermediates: the pass leaves the region to Inductor
    dynamic = chunk_plan(cfg, rows=None, device_type="cuda", device_memory=80 * GIB, **LLAMA8B_MLP)
    assert not dynamic.whole and dynamic.chunks.chunk_rows >= CUDA_MIN_ROWS  # decided per call by the op


def test_fixed_settings_win_on_every_device():
    for dev in ("cpu", "cuda"):
        p = chunk_plan(mst_compile.MSTConfig(num_chunks=4), rows=1000, device_type=dev, device_memory=GIB, **LLAMA8B_MLP)
        assert (p.chunks.num_chunks, p.label, p.whole) == (4, "4", False)
        p = chunk_plan(mst_compile.MSTConfig(chunk_tokens=300), rows=1000, device_type=dev, device_memory=GIB,
                       **LLAMA8B_MLP)  # fmt: skip
        assert (p.chunks.chunk_rows, p.label) == (300, "4")


def test_a_head_with_an_op_by_op_tail_gets_smaller_chunks():
    """NOTE [tail temporaries]: a softcapped head's chunk holds several [rows, vocab] temporaries, so its
    automatic chunks are smaller (256 tokens, the floor) than a plain head's (512) at the same vocabulary."""
    import mst_compile
    from tests.conftest import regions, rewrite
    from tests.modules import LMHead

    hs, y = torch.randn(1, 2048, 16), torch.randint(0, 32000, (1, 2048))
    chunks = {}
    for name, head in (("plain", LMHead(h=16, v=32000)), ("softcap", LMHead(h=16, v=32000, softcap=5.0))):
        with torch.no_grad():
            _, ctx, _ = rewrite(head, hs, y, config=mst_compile.MSTConfig())
        (r,) = regions(ctx, "head", "rewritten")
        chunks[name] = r.chunks
    assert chunks == {"plain": "4", "softcap": "8"}, chunks


def test_chunking_is_kept_only_where_it_pays_for_its_accumulator():
    """NOTE [chunking pays]: llama-small's head (H=512, V=32000) with bf16 weights at 1024 tokens: one chunk
    (512 rows x 6 bytes x V) plus its weight gradient's fp32 accumulator (4 bytes x V x H) is more than the whole
    head's bf16 logits and gradient (1024 x 4 bytes x V): whole. At 8192 tokens it is chunked, and without the
    accumulator's cost (fp32 weights) it is chunked at 1024 too."""
    cfg = mst_compile.MSTConfig()
    head = dict(input_size=512 * 2, wide_size=32000 * 4, row_bytes=32000 * 6, fixed_bytes=4 * 32000 * 512,
                whole_row_bytes=32000 * 4)  # fmt: skip
    p = chunk_plan(cfg, rows=1024, **head)
    assert p.whole and "NOTE [chunking pays]" in p.why, p
    assert not chunk_plan(cfg, rows=8192, **head).whole
    assert not chunk_plan(cfg, rows=1024, **{**head, "fixed_bytes": 0}).whole
    assert not chunk_plan(mst_compile.MSTConfig(num_chunks=2), rows=1024, **head).whole  # a fixed count is kept


def _head_status(head, dtype) -> list[str]:
    """The head region's status when ``head`` is traced at 1024 tokens under the default config."""
    from tests.conftest import rewrite

    hs = torch.randn(1, 1024, 512, dtype=dtype, requires_grad=True)
    _, ctx, _ = rewrite(head, hs, torch.randint(0, 4000, (1, 1024)), config=mst_compile.MSTConfig())
    return [r.status for r in ctx.regions if r.kind == "head"]


def test_a_bf16_head_counts_its_accumulator_and_its_gradient_copy():
    """The pass gives the plan what its op really holds (NOTE [tail temporaries], NOTE [chunking pays]): bf16 head
    weights that need a gradient leave a short head whole where fp32 weights, or a frozen bf16 head, are chunked."""
    status = {
        name: _head_status(LMHead(h=512, v=4000).to(dtype).requires_grad_(grad), dtype)
        for name, dtype, grad in (("bf16", torch.bfloat16, True), ("fp32", torch.float32, True),
                                  ("bf16 frozen", torch.bfloat16, False))
    }  # fmt: skip
    assert status == {"bf16": ["skipped"], "fp32": ["rewritten"], "bf16 frozen": ["rewritten"]}, status


def test_a_softcapped_bf16_head_is_still_chunked():
    """NOTE [chunking pays] weighs the accumulator only for a head with no tail: a softcapped bf16 head (Gemma-2)
    is chunked at the length where the plain one stays whole (measured: chunked 468 MiB, whole 567)."""
    status = {name: _head_status(LMHead(h=512, v=4000, **kw).to(torch.bfloat16), torch.bfloat16)
              for name, kw in (("plain", {}), ("softcap", {"softcap": 5.0}))}  # fmt: skip
    assert status == {"plain": ["skipped"], "softcap": ["rewritten"]}, status
