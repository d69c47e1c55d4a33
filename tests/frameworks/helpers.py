"""Shared by the framework tests: the example's model builders, eager-vs-mst parity, memory arms in subprocesses."""

import importlib.util
import json
import os
import subprocess
import sys

import torch

import mst_compile
from tests.conftest import assert_close_rel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: parity runs: mst's rewrite, then AOTAutograd without code generation (fast, same numbers as Inductor's ops)
FAST = {"num_chunks": 3, "compiler": "aot_eager"}


def examples():
    """``examples/frameworks.py`` as a module (its builders are what the memory arms run)."""
    name = "mst_examples_frameworks"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", "frameworks.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def param_grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training_step(ref_loss, ref_grads: dict, loss, model, rtol=1e-5):
    """Loss and every parameter gradient of the compiled step equal the eager step's."""
    assert_close_rel(loss, ref_loss, rtol=rtol, name="loss")
    got = param_grads(model)
    assert got.keys() == ref_grads.keys(), set(got) ^ set(ref_grads)
    for n, g in ref_grads.items():
        assert_close_rel(got[n], g, rtol=rtol, name=n)


def rewritten(kind: str) -> int:
    return mst_compile.counters[f"{kind}_rewritten"]


def describe() -> list:
    return [str(r) for r in mst_compile.reports()]


def memory_arm(framework: str, backend: str, tokens: int, *extra: str, timeout: float = 900) -> dict:
    """One arm of ``examples/frameworks.py`` in its own process: its JSON line (loss, peak MiB, mst counters)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.join(ROOT, "examples", "frameworks.py"), framework, "--backend", backend,
           "--tokens", str(tokens), *extra]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def compare_memory(framework: str, tokens: int, *extra: str) -> tuple[dict, dict]:
    base, mst = memory_arm(framework, "inductor", tokens, *extra), memory_arm(framework, "mst", tokens, *extra)
    assert abs(mst["loss"] - base["loss"]) <= 1e-4 * abs(base["loss"]), (mst["loss"], base["loss"])
    return base, mst


def restore_dynamo_config(names=("capture_scalar_outputs", "skip_fwd_side_effects_in_bwd_under_checkpoint")):
    """A generator fixture body: Dynamo settings a framework sets process-wide, put back afterwards."""
    cfg = torch._dynamo.config
    saved = {n: getattr(cfg, n) for n in names if hasattr(cfg, n)}
    yield
    for n, v in saved.items():
        setattr(cfg, n, v)
