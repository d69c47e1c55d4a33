"""The examples run as users run them (a subprocess each), and mst trains like Inductor in them."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(*args):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "plain_loop.py"), "--set", "train.steps=3",
                          "--set", "train.context=256", *args], capture_output=True, text=True, timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return [float(x) for x in re.findall(r"loss (\d+\.\d+)", out.stdout)], out.stdout


def test_plain_loop_config_switch():
    mst, text = _losses()  # the config's default: backend "mst"
    ind, _ = _losses("--set", "compile.backend=inductor")
    assert len(mst) == len(ind) == 3
    assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(mst, ind)), (mst, ind)
    assert "mlp" in text and "rewritten" in text  # the report printed by the example: regions were rewritten
