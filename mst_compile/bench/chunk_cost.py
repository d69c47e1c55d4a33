"""``python -m mst_compile.bench chunk-cost``: what one chunk costs in device-independent terms.

For the chunked MLP (SwiGLU), the head + cross-entropy and the head with a softcap between them (Gemma-2's
tail), per chunk: the ops launched (every aten op that
computes, views and allocations left out) and the bytes they read and write (each tensor argument read, each
result written; an in-place op reads and writes its tensor), and for the head the full passes over the chunk's
``[rows, vocab]`` logits (the ops that touch a tensor of that size). mst's ops are counted exactly by running
their kernels under a dispatch mode that sees every aten call, once with the chunk bodies op by op and once as
Inductor code (NOTE [compiled bodies]), where each generated kernel counts as one launch more (the profiler
names them; their bytes are not seen, so the bytes column then holds the aten ops' alone); the same region under
``torch.compile`` is
counted from what Inductor generated for one chunk's rows (its kernel count plus the GEMMs it calls; its own
bytes-accessed figure, which it keeps for GPU code only), so the columns compare code, not timings.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import _compat

_NOT_LAUNCHES = ("view", "_unsafe_view", "reshape", "t", "transpose", "slice", "select", "unsqueeze", "squeeze",
                 "expand", "as_strided", "detach", "alias", "permute", "_reshape_alias", "split", "unbind",
                 "empty", "empty_like", "new_empty", "empty_strided", "lift_fresh", "_to_copy_view")  # fmt: skip


@dataclass
class Cost:
    launches: int = 0
    bytes: int = 0
    ops: list = field(default_factory=list)
    big_passes: int = 0  # touches of a tensor with ``big_numel`` elements
    kernels: int = 0  # Inductor-generated kernels among the launches (compiled bodies)


class _Count(_compat.TorchDispatchMode):
    def __init__(self, big_numel: int = -1):
        super().__init__()
        self.cost, self.big = Cost(), big_numel

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name.split("::")[-1]
        if name in _NOT_LAUNCHES or name.startswith("empty"):
            return out
        ins = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        fresh = [o for o in outs if all(o.untyped_storage().data_ptr() != i.untyped_storage().data_ptr() for i in ins)]
        if not fresh and not name.endswith("_") and func._schema.is_mutable is False:
            return out  # a view of an input: no kernel
        touched = ins + fresh
        self.cost.launches += 1
        self.cost.ops.append(name)
        self.cost.bytes += sum(t.numel() * t.element_size() for t in touched)
        self.cost.big_passes += sum(t.numel() == self.big for t in touched)
        return out


def _kernel(op):
    return _compat.custom_op_kernel(op)


def _swiglu(x, wg, wu, wd):
    return F.silu(F.linear(x, wg)) * F.linear(x, wu)


def _softcap(z):
    """Gemma-2's final-logit softcap, the head's row-wise tail between the projection and the loss."""
    return (torch.tanh(z / 30.0) * 30.0).float()


def _generated_kernels(prof) -> int:
    """Inductor's C++ kernels that ran under ``prof`` (each recorded by name: ``cpp.enable_kernel_profile``)."""
    return sum("cpp_fused" in e.name for e in prof.events())


def mst_costs(rows: int, h: int, i: int, v: int, chunks: int, dtype=torch.float32, compiled: bool = False
              ) -> dict[str, Cost]:  # fmt: skip
    """Per-chunk cost of mst's ops over ``rows * chunks`` tokens (SwiGLU MLP; head + cross-entropy), the chunk
    bodies op by op or, with ``compiled``, as Inductor code (the head's cross-entropy where the op compiles it:
    ``linear_ce.compiles_cross_entropy``)."""
    from ..ops import fresh_compiled_bodies, linear_ce, registry, rowwise
    from ..ops.chunking import Chunks
    from ..ops.spec import HeadSpec, RowwiseSpec

    n = rows * chunks
    g = torch.Generator().manual_seed(0)
    x, grad = (torch.randn(n, h, generator=g).to(dtype) for _ in range(2))
    wg, wu, wd = (torch.randn(i, h, generator=g).to(dtype), torch.randn(i, h, generator=g).to(dtype),
                  torch.randn(h, i, generator=g).to(dtype))  # fmt: skip
    key = registry.register("mlp", torch.fx.symbolic_trace(_swiglu), h, None, exit_w=2, compiled=compiled)
    mlp = RowwiseSpec(key, Chunks(chunks)).dumps()
    w = torch.randn(v, h, generator=g).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    pre, post = registry.register_cast(dtype), registry.register_cast(torch.float32, compiled=compiled)
    head = HeadSpec(pre, post, chunks=Chunks(chunks), needs=(True, True, False)).dumps()
    tail = registry.register("post", torch.fx.symbolic_trace(_softcap), v, torch.float32, compiled=compiled)
    softcap = HeadSpec(registry.register_cast(dtype), tail, chunks=Chunks(chunks), needs=(True, True, False)).dumps()
    res = {}
    runs = {
        "mlp forward": (lambda: _kernel(rowwise.rowwise)(x, [wg, wu, wd], mlp), -1),
        "mlp backward": (lambda: _kernel(rowwise.rowwise_backward)(grad, x, [wg, wu, wd], mlp, [True] * 4), -1),
        "head forward+backward": (lambda: _kernel(linear_ce.linear_ce)(x, w, None, y, head), rows * v),
        "softcap head forward+backward": (lambda: _kernel(linear_ce.linear_ce)(x, w, None, y, softcap), rows * v),
    }  # fmt: skip
    # bodies compiled earlier in this process were built without the kernels' profiler records: compile afresh
    with _compat.inductor_config().patch({"cpp.enable_kernel_profile": True}), fresh_compiled_bodies():
        for name, (fn, big) in runs.items():
            if compiled:
                fn()  # the bodies compile on their first call: not a chunk's cost
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, _Count(big) as c:
                fn()
            cost, k = c.cost, _generated_kernels(prof)
            res[name] = Cost(round((cost.launches + k) / chunks), cost.bytes // chunks, cost.ops,
                             round(cost.big_passes / chunks), round(k / chunks))  # fmt: skip
    return res


def compile_costs(rows: int, h: int, i: int, v: int, dtype=torch.float32) -> dict[str, Cost]:
    """The same regions at one chunk's rows under ``torch.compile``: Inductor's kernels plus its GEMM calls."""
    metrics = _compat.inductor_metrics()
    g = torch.Generator().manual_seed(0)
    gate, up, down = (torch.nn.Linear(h, i, bias=False), torch.nn.Linear(h, i, bias=False),
                      torch.nn.Linear(i, h, bias=False))  # fmt: skip
    head = torch.nn.Linear(h, v, bias=False)
    for m in (gate, up, down, head):
        m.to(dtype)
    regions = {
        "mlp": (lambda x: down(F.silu(gate(x)) * up(x)), lambda out: out.backward(torch.ones_like(out))),
        "head": (lambda x: F.cross_entropy(head(x).float(), torch.randint(0, v, (rows,), generator=g)),
                 lambda out: out.backward()),
        "softcap head": (lambda x: F.cross_entropy(_softcap(head(x)), torch.randint(0, v, (rows,), generator=g)),
                         lambda out: out.backward()),
    }
    res = {}
    for name, (fwd, bwd) in regions.items():
        torch.compiler.reset()
        metrics.reset()
        x = torch.randn(rows, h, generator=g).to(dtype).requires_grad_()
        fn = torch.compile(fwd, backend="inductor")
        with _compat.inductor_config().patch(force_disable_caches=True):
            out = fn(x)
            bwd(out)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            bwd(fn(x))
        gemms = [e for e in prof.events() if e.name in ("aten::mm", "aten::addmm", "aten::bmm")]
        # Inductor counts the bytes its kernels access only for GPU code (0 on the CPU): reported where known
        res[name] = Cost(metrics.generated_kernel_count + len(gemms), metrics.num_bytes_accessed,
                         [f"{metrics.generated_kernel_count} generated kernels", f"{len(gemms)} GEMMs"])  # fmt: skip
    return res


def _mib(b: int) -> str:
    return f"{b / 2**20:.1f}" if b else "n/a (CPU)"


def table(rows: int, h: int, i: int, v: int, chunks: int, dtype=torch.float32) -> str:
    comp = compile_costs(rows, h, i, v, dtype)
    name = str(dtype).replace("torch.", "")
    lines = [f"per chunk of {rows} tokens (H={h}, I={i}, V={v}, {name}); torch.compile: the region at {rows} tokens, "
             "forward + backward together; mst compiled: the chunk bodies as Inductor code (launches include its "
             "kernels, bytes are the aten ops' alone)", "region | mst bodies | mst launches | mst MiB r+w | "
             "passes over [chunk, vocab] | torch.compile launches | torch.compile MiB (Inductor's count)"]  # fmt: skip
    for compiled in (False, True):
        mst, how = mst_costs(rows, h, i, v, chunks, dtype, compiled), "compiled" if compiled else "op by op"
        fwd, bwd, hd = mst["mlp forward"], mst["mlp backward"], mst["head forward+backward"]
        lines.append(f"mlp (fwd, bwd) | {how} | {fwd.launches}, {bwd.launches} | {fwd.bytes / 2**20:.1f}, "
                     f"{bwd.bytes / 2**20:.1f} | - | {comp['mlp'].launches} | {_mib(comp['mlp'].bytes)}")
        lines.append(f"head + CE (fwd+bwd) | {how} | {hd.launches} | {hd.bytes / 2**20:.1f} | {hd.big_passes} | "
                     f"{comp['head'].launches} | {_mib(comp['head'].bytes)}")
        sc, csc = mst["softcap head forward+backward"], comp["softcap head"]
        lines.append(f"head + softcap + CE (fwd+bwd) | {how} | {sc.launches} | {sc.bytes / 2**20:.1f} | "
                     f"{sc.big_passes} | {csc.launches} | {_mib(csc.bytes)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mst_compile.bench chunk-cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=512, help="tokens per chunk (default: 512)")
    ap.add_argument("--chunks", type=int, default=4, help="chunks in the measured call (default: 4)")
    ap.add_argument("--hidden", type=int, default=512, help="H (default: 512, the benchmark's model)")
    ap.add_argument("--intermediate", type=int, default=2048, help="I (default: 2048)")
    ap.add_argument("--vocab", type=int, default=32000, help="V (default: 32000)")
    ap.add_argument("--dtype", default="float32", help="parameter dtype (default: float32)")
    a = ap.parse_args(argv)
    print(table(a.rows, a.hidden, a.intermediate, a.vocab, a.chunks, getattr(torch, a.dtype)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
