"""The examples run as users run them (a subprocess each), and mst trains like Inductor in them."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(*args):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "plain_loop.py"), "--set", "train.steps=3",
                          "--set", "train.context=256", *args], capture_output=True, text=True, timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return [float(x) for x in re.findall(r"loss (\d+\.\d+)", out.stdout)], out.stdout


@pytest.mark.slow
def test_plain_loop_config_switch():
    mst, text = _losses()  # the config's default: backend "mst"
    ind, _ = _losses("--set", "compile.backend=inductor")
    assert len(mst) == len(ind) == 3
    assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(mst, ind)), (mst, ind)
    assert "mlp" in text and "rewritten" in text  # the report printed by the example: regions were rewritten


@pytest.mark.slow
def test_long_context_example_measures_cpu_peaks_as_the_user_runs_it(tmp_path):
    """Run without ``MALLOC_MMAP_THRESHOLD_`` (as a user would): the example must still measure the step's peak
    (measured here: 28 MiB with the variable; without it, before the example set it itself, 0)."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    args = ["--backend", "eager", "--context", "2048", "--steps", "5", "--hidden", "64", "--device", "cpu"]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train_long_context.py"), *args, "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    peaks = sorted(json.load(open(tmp_path / "eager-2048.json"))["peak_mib"][2:])
    assert peaks[len(peaks) // 2] > 10, peaks
