"""``options={"verify": True}``: parity of the rewritten graph checked on the user's own model and inputs.

NOTE [verify]: on the first call of each compiled graph the backend also runs the original (unrewritten) Dynamo
graph eagerly on the same inputs, and both backwards with the same output gradients (``torch.autograd.grad``,
so nothing is accumulated into ``.grad``), and compares every output and every input gradient. The largest
relative error (``max |a - b| / max |b|``) of each is reported next to the tolerance of its compute dtype
(:data:`TOLERANCE`); a mismatch warns (``verify=True``/``"warn"``) or raises :class:`VerifyError`
(``verify="raise"``). Later calls run the compiled code alone, so it costs one extra eager step, once: run it
at a length where the unchunked eager step fits.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch

log = logging.getLogger("mst_compile")

#: largest relative error accepted, by the dtype the values were computed in
TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


class VerifyError(RuntimeError):
    """The rewritten graph's outputs or gradients differ from the original graph's beyond the tolerance."""


@dataclass
class Check:
    what: str  # "output 0", "gradient of input 3"
    error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance

    def line(self) -> str:
        flag = "" if self.ok else "  MISMATCH"
        return f"{self.what}: max rel err {self.error:.2e} (tolerance {self.tolerance:.0e}){flag}"


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|`` in fp64; infinite where the NaN patterns differ."""
    a, b = a.detach().double(), b.detach().double()
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return float("inf")
    a, b = a.nan_to_num(), b.nan_to_num()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() if b.numel() else 0.0


def _compute_dtype(t: torch.Tensor, low: torch.dtype | None) -> torch.dtype:
    return low if low is not None and t.is_floating_point() and t.dtype.itemsize > low.itemsize else t.dtype


def _low_precision(gm: torch.fx.GraphModule, args) -> torch.dtype | None:
    """The lowest floating precision the graph computes in: autocast (around the call or inside), or inputs."""
    found = [torch.get_autocast_dtype(d) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
    for n in gm.graph.nodes:
        if n.op == "call_function" and getattr(n.target, "__name__", "") == "_enter_autocast":
            found.append(n.args[1] if len(n.args) > 1 and n.args[1] is not None else torch.bfloat16)
    found += [a.dtype for a in args if isinstance(a, torch.Tensor) and a.dtype in (torch.float16, torch.bfloat16)]
    return min(found, key=lambda d: (d.itemsize, d is not torch.bfloat16)) if found else None  # bf16 before fp16


def _flat(outs) -> list:
    return list(outs) if isinstance(outs, (list, tuple)) else [outs]


def _inputs(args):
    """Fresh leaves over the same storage for inputs that need a gradient, clones of the other tensors (the
    original graph may modify its inputs in place; a second run must not modify them again)."""
    new, leaves = [], []
    for a in args:
        if isinstance(a, torch.Tensor) and a.requires_grad:
            a = a.detach().requires_grad_(True)
            leaves.append(a)
        elif isinstance(a, torch.Tensor):
            a = a.clone()
        new.append(a)
    return new, leaves


def compare(compiled, original: torch.fx.GraphModule, args) -> list[Check]:
    """Run ``compiled`` and ``original`` on ``args`` (forward, then backward with shared output gradients)."""
    low = _low_precision(original, args)
    gen = torch.Generator().manual_seed(0)
    ref_args, ref_leaves = _inputs(args)
    got_args, got_leaves = _inputs(args)
    ref, got = _flat(original(*ref_args)), _flat(compiled(*got_args))
    checks = []
    for i, (a, b) in enumerate(zip(got, ref)):
        if isinstance(b, torch.Tensor) and isinstance(a, torch.Tensor) and b.is_floating_point():
            checks.append(Check(f"output {i}", relative_error(a, b), TOLERANCE.get(_compute_dtype(b, low), 1e-4)))
    diff = [i for i, (a, b) in enumerate(zip(got, ref)) if isinstance(b, torch.Tensor) and b.requires_grad
            and isinstance(a, torch.Tensor) and a.requires_grad]  # fmt: skip
    if diff and ref_leaves:
        gouts = [torch.ones_like(ref[i]) if ref[i].dim() == 0 else torch.randn(ref[i].shape, generator=gen).to(ref[i])
                 for i in diff]  # fmt: skip
        g_ref = torch.autograd.grad([ref[i] for i in diff], ref_leaves, gouts, allow_unused=True)
        g_got = torch.autograd.grad([got[i] for i in diff], got_leaves, gouts, allow_unused=True)
        pos = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
        for p, a, b in zip(pos, g_got, g_ref):
            if a is None and b is None:
                continue
            if a is None or b is None:
                checks.append(Check(f"gradient of input {p}", float("inf"), 0.0))
                continue
            tol = TOLERANCE.get(_compute_dtype(b, low), 1e-4)
            checks.append(Check(f"gradient of input {p}", relative_error(a, b), tol))
    return checks


def verifying(compiled, original: torch.fx.GraphModule, mode, report):
    """``compiled``, with :func:`compare` run on its first call; the result goes to ``report.verify``."""
    state = {"done": False}

    def run(*args):
        if not state["done"]:
            state["done"] = True
            checks = compare(compiled, original, args)
            report.verify = checks
            bad = [c for c in checks if not c.ok]
            text = f"mst verify, {report.graph}: " + ("; ".join(c.line() for c in bad) if bad else "all match")
            log.info("%s\n  %s", text, "\n  ".join(c.line() for c in checks))
            if bad and mode == "raise":
                raise VerifyError(text)
            if bad:
                warnings.warn(text, stacklevel=2)
        return compiled(*args)

    return run
