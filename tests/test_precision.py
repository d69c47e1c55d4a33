"""bf16: autocast (inside the compiled code and around it) and bf16 parameters.

Documented tolerance: against an fp32 reference, mst's bf16 gradients are at least as close as eager bf16's
(relative L2 error per parameter, ratio <= 1.1); against eager bf16 itself they agree to bf16 rounding
(relative L2 <= 3e-2). Weight gradients are accumulated across chunks in fp32.
"""

import contextlib

import pytest
import torch

import mst_compile
from mst_compile.bench import zoo
from tests.conftest import grads


def _rel(a: dict, ref: dict) -> dict:
    return {n: ((a[n].double() - ref[n].double()).norm() / ref[n].double().norm().clamp_min(1e-30)).item() for n in ref}


def _run(model, fn, ids):
    loss = fn(model, ids)
    loss.backward()
    g = grads(model)
    model.zero_grad(set_to_none=True)
    return loss.detach().double(), g


def _ids():
    return torch.randint(0, zoo.V, (2, 40), generator=torch.Generator().manual_seed(0))


def _inside(model, ids):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(input_ids=ids, labels=ids).loss


def _plain(model, ids):
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("mode", ["autocast-inside", "autocast-around", "bf16-params"])
def test_bf16_matches_eager_bf16_and_is_as_close_to_fp32(mode):
    ids = _ids()
    ref_loss, ref = _run(zoo.build("llama"), _plain, ids)  # fp32 reference
    model = zoo.build("llama")
    fn = _inside if mode == "autocast-inside" else _plain
    if mode == "bf16-params":
        model = model.to(torch.bfloat16)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast-around" else torch.autocast("cpu", enabled=False)
    with ctx:
        eager_loss, eager = _run(model, fn, ids)
    cm = torch.compile(model, backend="mst", options={"num_chunks": 4, "compiler": "aot_eager"})
    with ctx:
        mst_loss, got = _run(cm, fn, ids)
    assert (mst_compile.counters["mlp_rewritten"], mst_compile.counters["head_rewritten"]) == (2, 1)
    assert abs(mst_loss - eager_loss) <= 1e-2 * abs(eager_loss)
    vs_eager, eager_err, mst_err = _rel(got, eager), _rel(eager, ref), _rel(got, ref)
    for n in ref:
        assert got[n].dtype == eager[n].dtype, n
        assert vs_eager[n] <= 3e-2, (n, vs_eager[n])
        assert mst_err[n] <= 1.1 * eager_err[n] + 1e-3, (n, mst_err[n], eager_err[n])


class _LM(torch.nn.Module):
    """Embedding, a SwiGLU MLP, a linear head and ``F.cross_entropy`` on the head's raw output (nanoGPT's loss,
    no explicit upcast) or on ``.float()`` of it (HF's)."""

    def __init__(self, v=512, h=32, i=96, upcast=False):
        super().__init__()
        self.emb = torch.nn.Embedding(v, h)
        self.gate, self.up = torch.nn.Linear(h, i, bias=False), torch.nn.Linear(h, i, bias=False)
        self.down, self.head = torch.nn.Linear(i, h, bias=False), torch.nn.Linear(h, v, bias=False)
        self.upcast = upcast

    def forward(self, ids, labels, amp=False):
        # no autocast context at all unless asked: ``autocast(enabled=False)`` inside an autocast block is a mode
        # of its own (plain Inductor's backward does not follow eager there: see test_autocast_off_inside)
        with torch.autocast("cpu", torch.bfloat16) if amp else contextlib.nullcontext():
            x = self.emb(ids)
            x = x + self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))
            logits = self.head(x)
            logits = logits.float() if self.upcast else logits
            return torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))


# NOTE [precision modes]: each mode is (parameter dtype, autocast around the compiled call, autocast inside it).
PRECISION_MODES = {
    "fp32": (torch.float32, False, False),
    "bf16-params": (torch.bfloat16, False, False),
    "fp16-params": (torch.float16, False, False),
    "autocast-around": (torch.float32, True, False),
    "autocast-inside": (torch.float32, False, True),
}


def _lm_step(model, ids, labels, around: bool, inside: bool):
    with torch.autocast("cpu", torch.bfloat16, enabled=around):
        loss = model(ids, labels, amp=inside)
    loss.backward()
    g = grads(model)
    model.zero_grad(set_to_none=True)
    return loss.detach(), g


@pytest.mark.parametrize("upcast", [False, True], ids=["raw-logits", "upcast"])
@pytest.mark.parametrize("mode", list(PRECISION_MODES))
def test_loss_dtype_and_error_follow_eager(mode, upcast):
    """The loss has eager's dtype (fp32 under autocast: cross_entropy is on its fp32 list) and, like every
    gradient, is no further from an fp64 run of the same weights than eager's own result is."""
    dtype, around, inside = PRECISION_MODES[mode]
    torch.manual_seed(0)
    model = _LM(upcast=upcast).to(dtype)
    gen = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, 512, (2, 384), generator=gen), torch.randint(0, 512, (2, 384), generator=gen)
    ref_model = _LM(upcast=upcast).double()
    ref_model.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    ref_loss, ref = _lm_step(ref_model, ids, labels, False, False)
    eager_loss, eager = _lm_step(model, ids, labels, around, inside)
    cm = torch.compile(model, backend="mst", options={"num_chunks": 3, "compiler": "aot_eager"})
    mst_loss, got = _lm_step(cm, ids, labels, around, inside)
    assert (mst_compile.counters["mlp_rewritten"], mst_compile.counters["head_rewritten"]) == (1, 1)
    assert mst_loss.dtype == eager_loss.dtype, (mst_loss.dtype, eager_loss.dtype)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[eager_loss.dtype]
    mst_err, eager_err = abs(mst_loss.double() - ref_loss).item(), abs(eager_loss.double() - ref_loss).item()
    assert mst_err <= max(1.25 * eager_err, tol * abs(ref_loss).item()), (mst_err, eager_err)
    vs_ref, eager_vs_ref = _rel(got, ref), _rel(eager, ref)
    for n in ref:
        assert got[n].dtype == eager[n].dtype, n
        assert vs_ref[n] <= 1.25 * eager_vs_ref[n] + 1e-5, (n, vs_ref[n], eager_vs_ref[n])


def test_autocast_off_inside_an_autocast_block_keeps_the_region_in_fp32():
    """A region under ``autocast(enabled=False)`` inside an autocast block: mst's ops run it in fp32, as eager
    does (the ops run inside the caller's autocast and turn it off, ``registry.no_autocast``). Plain Inductor and
    aot_eager compute that region's backward in bf16 here (torch 2.13), so the reference is eager."""

    class Off(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(16, 64, bias=False)

        def forward(self, x, y):
            with torch.autocast("cpu", enabled=False):
                return torch.nn.functional.cross_entropy(self.head(x), y)

    torch.manual_seed(0)
    model, x, y = Off(), torch.randn(40, 16, requires_grad=True), torch.randint(0, 64, (40,))
    with torch.autocast("cpu", torch.bfloat16):
        ref = model(x, y)
    ref.backward()
    ref_g, ref_x = model.head.weight.grad.clone(), x.grad.clone()
    model.zero_grad(set_to_none=True)
    x.grad = None
    cm = torch.compile(model, backend="mst", options={"num_chunks": 3, "compiler": "aot_eager"})
    with torch.autocast("cpu", torch.bfloat16):
        loss = cm(x, y)
    loss.backward()
    assert mst_compile.counters["head_rewritten"] == 1 and loss.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(model.head.weight.grad, ref_g, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad, ref_x, rtol=1e-5, atol=1e-7)
