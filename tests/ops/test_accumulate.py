"""NOTE [weight-gradient accumulation]: one accumulator for both ops."""

import pytest
import torch

from mst_compile.ops.accumulate import GradAccumulator
from mst_compile.ops.chunking import Chunks
from mst_compile.ops.spec import HeadSpec
from tests.conftest import rowwise_spec


def _parts(dtype, n=3, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(24, 10, generator=g).to(device, dtype), torch.randn(10, 16, generator=g).to(device, dtype))
            for _ in range(n)]  # fmt: skip


def _ops(fn) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name.startswith("aten::")]


def test_one_chunk_is_the_gemm_in_the_parameter_dtype():
    (a, b), = _parts(torch.bfloat16, 1)
    acc = GradAccumulator(torch.empty(24, 16, dtype=torch.bfloat16), num_chunks=1)
    ops = _ops(lambda: acc.add_mm(a, b))
    assert acc.acc.dtype == torch.bfloat16 and torch.equal(acc.result(), torch.mm(a, b))
    assert "aten::zeros" not in ops and "aten::add_" not in ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_chunk_writes_the_next_accumulate_in_place(dtype):
    parts = _parts(dtype)
    acc = GradAccumulator(torch.empty(24, 16, dtype=dtype), num_chunks=len(parts))

    def run():
        for a, b in parts:
            acc.add_mm(a, b)

    ops = _ops(run)
    assert not {"aten::zeros", "aten::zero_", "aten::fill_"} & set(ops)  # no zero-fill: beta = 0 on chunk 1
    assert acc.acc.dtype == torch.float32  # fp32 across chunks for bf16 parameters
    if dtype == torch.float32:
        assert ops.count("aten::addmm_") == len(parts) - 1
    ref = sum(torch.mm(a, b).float() for a, b in parts)
    torch.testing.assert_close(acc.result(), ref.to(dtype), rtol=0, atol=0)


def test_gradients_and_row_sums():
    acc = GradAccumulator(torch.empty(16), num_chunks=2)
    base = torch.randn(4, 16)
    acc.add(base[0])  # a view: copied, never written through
    acc.add(None)
    acc.add(base[1])
    torch.testing.assert_close(acc.result(), base[0] + base[1])
    assert GradAccumulator(torch.empty(3, dtype=torch.float16), 4).result().abs().sum() == 0
    t = torch.randn(16, 8).t()  # a transposed gradient (a transposed weight's): the result is contiguous
    one = GradAccumulator(torch.empty(8, 16), num_chunks=1)
    one.add(t)
    assert one.result().is_contiguous() and torch.equal(one.result(), t)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_low_precision_gemm_accumulates_with_fp32_output():
    from mst_compile.ops.accumulate import _fp32_out_gemm

    parts = _parts(torch.bfloat16, device="cuda")
    acc = GradAccumulator(torch.empty(24, 16, dtype=torch.bfloat16, device="cuda"), num_chunks=3)
    for a, b in parts:
        acc.add_mm(a, b)
    exact = sum(a.double() @ b.double() for a, b in parts)
    if _fp32_out_gemm("cuda", torch.bfloat16):  # no partial rounded to bf16: the fp32 sum is close to exact
        assert (acc.acc.double() - exact).abs().max() < 1e-3 * exact.abs().max()


@pytest.mark.parametrize("chunks", [1, 3])
def test_the_ops_make_no_zero_filled_weight_buffers(chunks):
    """Both ops accumulate through :class:`GradAccumulator`: no ``zeros`` of a weight's shape in either."""
    import torch.nn.functional as F

    from mst_compile.ops import registry

    h, i, v, rows = 8, 24, 40, 12
    key = registry.register_fn("test", "acc-mlp", lambda x, wg, wd: F.silu(F.linear(x, wg)), h, None, exit_w=1)
    x, wg, wd, g = torch.randn(rows, h), torch.randn(i, h), torch.randn(h, i), torch.randn(rows, h)
    cast = registry.register_cast(torch.float32)
    y = torch.randint(0, v, (rows,))
    w = torch.randn(v, h)

    mlp, head = rowwise_spec(key, chunks), HeadSpec(cast, cast, chunks=Chunks(chunks), needs=(True, True, False)).dumps()

    def run():
        torch.ops.mst.rowwise_backward(g, x, [wg, wd], mlp, [True, True, True])
        torch.ops.mst.linear_ce(x, w, None, y, head)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    weight_shapes = {(i, h), (h, i), (v, h)}
    zeros = [e for e in prof.events() if e.name in ("aten::zeros", "aten::zero_")
             and any(tuple(s) in weight_shapes for s in e.input_shapes if s)]  # fmt: skip
    assert not zeros, [(e.name, e.input_shapes) for e in zeros]


def test_low_precision_fallback_adds_a_block_of_rows_at_a_time(monkeypatch):
    """Where no fp32-output GEMM exists (the CPU), each chunk's bf16 GEMM runs a block of the weight's rows at a
    time, so its temporary stays under ``BLOCK_BYTES`` instead of one weight-sized bf16 tensor per chunk."""
    from mst_compile.ops import accumulate

    monkeypatch.setattr(accumulate, "BLOCK_BYTES", 4 * 16 * 2)  # 4 rows of 16 bf16 columns
    parts = _parts(torch.bfloat16)
    acc = GradAccumulator(torch.empty(24, 16, dtype=torch.bfloat16), num_chunks=len(parts))

    def run():
        for a, b in parts:
            acc.add_mm(a, b)

    ops = _ops(run)
    assert ops.count("aten::mm") == len(parts) * 24 // 4
    ref = sum(torch.mm(a, b).float() for a, b in parts)
    torch.testing.assert_close(acc.result(), ref.to(torch.bfloat16), rtol=0, atol=0)
