"""The saving must survive Inductor: peak of one compiled step, mst vs torch.compile default.

Each arm runs in its own process (``mst_compile.bench.worker``), peak RSS of a step measured after warm-up.
A regression of the saving (Inductor fusing across chunks, the partitioner keeping per-chunk values alive,
full logits reappearing) fails these ratios.
"""

import pytest

from mst_compile.bench.measure import run_worker

TOKENS = "4096"
COMMON = ["--model", "llama-mem", "--tokens", TOKENS, "--steps", "1"]


def _peak(arm, form, options=None):
    args = ["--arm", arm, "--form", form, *COMMON] + (["--options", options] if options else [])
    r = run_worker(args, timeout=900)
    assert "peak_mib" in r, r
    return r


@pytest.fixture(scope="module")
def step_peaks():
    return {arm: _peak(arm, "step") for arm in ("compile", "mst")}


def test_compiled_step_peak_is_well_below_torch_compile(step_peaks):
    base, mst = step_peaks["compile"], step_peaks["mst"]
    assert mst["rewritten"] == 3
    assert abs(mst["loss"] - base["loss"]) < 1e-4 * abs(base["loss"])
    ratio = mst["peak_mib"] / base["peak_mib"]
    # measured here: ~0.3-0.4 (the target at 8K tokens is <= 0.50); margin for allocator noise
    assert ratio < 0.6, (mst["peak_mib"], base["peak_mib"])


def test_compiled_model_with_logits_returned_peak_is_below_torch_compile():
    base, mst = _peak("compile", "model"), _peak("mst", "model")
    ratio = mst["peak_mib"] / base["peak_mib"]
    # the returned logits alone are ~1/4 of torch.compile's peak here; mst must not add a second copy
    assert ratio < 0.75, (mst["peak_mib"], base["peak_mib"])
