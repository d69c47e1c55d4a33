"""The saving must survive Inductor: peak of one compiled step, mst vs torch.compile default.

Each arm runs in its own process (``mst_compile.bench.worker``), peak RSS of a step measured after warm-up.
A regression of the saving (Inductor fusing across chunks, the partitioner keeping per-chunk values alive,
full logits reappearing) fails these ratios.
"""

import pytest

from mst_compile.bench.measure import run_worker

pytestmark = pytest.mark.slow  # each measurement compiles in its own process

TOKENS = "4096"
COMMON = ["--model", "llama-mem", "--tokens", TOKENS, "--steps", "1"]


def _peak(arm, form, options=None):
    args = ["--arm", arm, "--form", form, *COMMON] + (["--options", options] if options else [])
    r = run_worker(args, timeout=900)
    assert "peak_mib" in r, r
    return r


#: mst as it shipped before commit 0e335be: no selective recompute, Inductor's buffer reuse on
KEEP_ALL = '{"recompute": "none", "inductor": {"allow_buffer_reuse": true}}'


#: Inductor's horizontal fusion back on (NOTE [horizontal fusion]), everything else the default
HORIZONTAL_FUSION = '{"inductor": {"score_fusion_memory_threshold": 10}}'


@pytest.fixture(scope="module")
def step_peaks():
    peaks = {arm: _peak(arm, "step") for arm in ("compile", "mst")}
    peaks["mst_keep_all"] = _peak("mst", "step", KEEP_ALL)
    peaks["mst_ckpt"] = _peak("mst_ckpt", "step")
    peaks["mst_ckpt_fused"] = _peak("mst_ckpt", "step", HORIZONTAL_FUSION)
    return peaks


def test_compiled_step_peak_is_well_below_torch_compile(step_peaks):
    base, mst = step_peaks["compile"], step_peaks["mst"]
    assert mst["rewritten"] == 3
    assert abs(mst["loss"] - base["loss"]) < 1e-4 * abs(base["loss"])
    ratio = mst["peak_mib"] / base["peak_mib"]
    # measured here: 0.14 (38 vs 280 MiB; 0.21 before selective recompute). Without the causal-mask pass it
    # would be ~0.5 (its float mask is 64 MiB here), without the chunked head and MLP more: either regression
    # fails this bound
    assert ratio < 0.4, (mst["peak_mib"], base["peak_mib"])


def test_selective_recompute_lowers_the_compiled_step_peak(step_peaks):
    """NOTE [selective recompute] and NOTE [buffer reuse] after Inductor: the norm outputs and q, k, v are not
    kept from forward to backward, and no dead buffer is held across the attention backward."""
    default, keep_all = step_peaks["mst"], step_peaks["mst_keep_all"]
    assert default["loss"] == pytest.approx(keep_all["loss"], rel=1e-5)
    # measured here: 37.9 vs 57.9 MiB (0.65). Losing the recompute (norm outputs, q, k, v: 2 MiB each per layer
    # at 4096 tokens, H=128) moves it above this bound; the buffer reuse alone is 4 MiB here (its patch is
    # checked in test_backend.py, its effect measured at larger sizes in the README)
    assert default["peak_mib"] < 0.8 * keep_all["peak_mib"], (default["peak_mib"], keep_all["peak_mib"])


def test_checkpointing_under_mst_recomputes_each_value_where_it_is_used(step_peaks):
    """HF gradient checkpointing under mst: the last layer's output is saved (NOTE [checkpointed region
    outputs]), q, k, v and the norm outputs are recomputed again after the big ops that separate their uses
    (NOTE [second recompute]), and Inductor does not fuse those recomputations back to where they came from
    (NOTE [horizontal fusion])."""
    ckpt, fused = step_peaks["mst_ckpt"], step_peaks["mst_ckpt_fused"]
    assert ckpt["loss"] == pytest.approx(step_peaks["mst"]["loss"], rel=1e-5)
    # measured here: 29.9 vs 44.2 MiB with horizontal fusion (0.68); with all three off 42.0
    assert ckpt["peak_mib"] < 0.8 * fused["peak_mib"], (ckpt["peak_mib"], fused["peak_mib"])


def test_compiled_model_with_logits_returned_peak_is_below_torch_compile():
    base, mst = _peak("compile", "model"), _peak("mst", "model")
    ratio = mst["peak_mib"] / base["peak_mib"]
    # measured here: 0.35 (186 vs 532 MiB); the returned logits alone are 128 MiB, a second copy fails this
    assert ratio < 0.55, (mst["peak_mib"], base["peak_mib"])


def test_large_vocabulary_head_chunks_follow_the_minimum_chunk_policy():
    """NOTE [minimum chunk] after Inductor: on a V=65536, H=64 model (a 512-token chunk of fp32 logits is
    128 MiB) the default's 256-token head chunks must lower the step peak against 512-token chunks."""
    args = ["--form", "step", "--model", "vocab-mem", "--tokens", "2048", "--steps", "1"]
    runs = {}
    for name, extra in (("compile", ["--arm", "compile"]), ("mst", ["--arm", "mst"]),
                        ("mst512", ["--arm", "mst", "--options", '{"min_chunk_tokens": 512}'])):  # fmt: skip
        runs[name] = run_worker(extra + args, timeout=900)
        assert "peak_mib" in runs[name], runs[name]
    peak = {k: r["peak_mib"] for k, r in runs.items()}
    assert runs["mst"]["loss"] == pytest.approx(runs["compile"]["loss"], rel=1e-5)
    # measured here: 90 MiB (256-token chunks) vs 153 (512) vs 548 (torch.compile). Keeping the previous
    # chunk's logits gradient alive while the next chunk's logits are made (fixed in the op) measured 154: 0.28
    assert peak["mst"] < 0.75 * peak["mst512"], peak
    assert peak["mst"] < 0.22 * peak["compile"], peak
