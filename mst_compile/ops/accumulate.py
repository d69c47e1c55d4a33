"""One weight-gradient accumulator for the chunk loops of both ops.

NOTE [weight-gradient accumulation]: every chunk adds its share ``a @ b`` (a GEMM) or an autograd gradient into
the parameter's gradient. Rules, the same in ``mst::rowwise_backward`` and ``mst::linear_ce``:
- one chunk: no accumulator; the gradient is that one GEMM in the parameter's dtype, as eager computes it;
- several chunks: an fp32 accumulator for bf16/fp16 parameters (the parameter's dtype otherwise), written by
  the first chunk (beta = 0: no zero-fill, no add) and updated in place by the next ones: ``addmm_`` when the
  GEMM's inputs have the accumulator's dtype; on CUDA a low-precision GEMM with fp32 output
  (``out_dtype=torch.float32``) straight into the accumulator where this torch supports it, so partial sums are
  never rounded to bf16 and no weight-sized temporary is made; elsewhere (the CPU) the GEMM in its own dtype
  and an fp32 add, a block of the weight's rows at a time, so the temporary stays under ``BLOCK_BYTES``
  (probed once per device and dtype, :func:`_fp32_out_gemm`).
The fp32 accumulator is the one memory cost chunking adds (4 bytes per weight element beside the gradient);
the head's chunk plan weighs it (NOTE [chunking pays]).
"""

from __future__ import annotations

import functools

import torch


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Gradients of low-precision parameters are accumulated across chunks in fp32."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def accumulator_bytes(params) -> int:
    """What accumulating these parameters' gradients over several chunks costs beyond the gradients themselves:
    an fp32 accumulator for each low-precision one (NOTE [chunking pays])."""
    return sum(4 * p.numel() for p in params if p is not None and acc_dtype(p) != p.dtype)


#: the largest low-precision GEMM temporary the fallback path makes (a block of the weight's rows)
BLOCK_BYTES = 4 * 2**20

#: the fp32-output GEMMs may be turned off (the benchmark's ``gpu-check`` measures both ways)
FP32_OUTPUT_GEMM = True


def _fp32_out_gemm(device_type: str, dtype: torch.dtype) -> bool:
    return FP32_OUTPUT_GEMM and fp32_out_gemm_works(device_type, dtype)


@functools.lru_cache(maxsize=None)
def fp32_out_gemm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`` works (and is right) here."""
    if device_type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        a = torch.randn(8, 16, device=device_type).to(dtype)
        b = torch.randn(16, 4, device=device_type).to(dtype)
        acc = torch.ones(8, 4, device=device_type)
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return bool(torch.allclose(acc, 1 + a.float() @ b.float(), rtol=1e-2, atol=1e-2))
    except Exception:  # noqa: BLE001 - not supported by this torch or device: use the fallback
        return False


def _blocked(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, write) -> None:
    """``write(acc[rows], a[rows] @ b)`` a block of rows at a time (the low-precision GEMM's temporary stays
    under ``BLOCK_BYTES``)."""
    step = max(1, BLOCK_BYTES // max(b.shape[1] * a.element_size(), 1))
    for s in range(0, a.shape[0], step):
        write(acc[s : s + step], torch.mm(a[s : s + step], b))


class GradAccumulator:
    """``add_mm(a, b)`` / ``add(g)`` once per chunk, then ``result()``: the gradient in the parameter's dtype."""

    def __init__(self, param: torch.Tensor, num_chunks: int):
        self.dtype, self.shape, self.device = param.dtype, param.shape, param.device
        self.acc_dtype = acc_dtype(param) if num_chunks > 1 else param.dtype
        self.acc: torch.Tensor | None = None

    def add_mm(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """``+= a @ b``."""
        if self.acc is None:  # the first chunk writes (beta = 0)
            if a.dtype == self.acc_dtype:
                self.acc = torch.mm(a, b)
            elif _fp32_out_gemm(a.device.type, a.dtype):
                self.acc = torch.mm(a, b, out_dtype=self.acc_dtype)
            else:
                self.acc = torch.empty((a.shape[0], b.shape[1]), dtype=self.acc_dtype, device=a.device)
                _blocked(self.acc, a, b, torch.Tensor.copy_)
        elif a.dtype == self.acc.dtype:
            self.acc.addmm_(a, b)
        elif _fp32_out_gemm(a.device.type, a.dtype):
            torch.addmm(self.acc, a, b, out_dtype=self.acc.dtype, out=self.acc)
        else:
            _blocked(self.acc, a, b, torch.Tensor.add_)

    def add(self, g: torch.Tensor | None) -> None:
        """``+= g`` (a bias's row sum, an autograd gradient)."""
        if g is None:
            return
        if self.acc is None:  # contiguous, as the ops' fake kernels promise (autograd may give a transposed grad)
            acc = g.to(self.acc_dtype).contiguous()
            self.acc = acc.clone() if acc._base is not None else acc  # never written through into a view's base
        else:
            self.acc.add_(g)

    def result(self) -> torch.Tensor:
        """The gradient, in the parameter's dtype (zeros where no chunk contributed)."""
        if self.acc is None:
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        return self.acc.to(self.dtype)
