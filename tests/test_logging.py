"""The documented ways to see mst's reports work in any import order (each case in a fresh process, since the
order of ``import torch`` and ``import mst_compile`` is what matters).

``import torch`` resets every logger registered with ``TORCH_LOGS`` (``mst`` is one), so a level set before it,
by ``MST_LOG`` or by ``setLevel``, must survive that reset.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SET_LEVEL = "import logging; logging.getLogger('mst_compile').setLevel(logging.INFO)"
#: what the backend does once per compiled graph (``add_report``), without compiling one
REPORT = "from mst_compile.report import Report, add_report\nadd_report(Report('3 nodes'))\n"
COMPILE = (
    "import torch\n"
    "torch.compile(lambda x: x * 2, backend='mst', options={'compiler': 'aot_eager'})(torch.randn(4))\n"
)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("MST_LOG", "TORCH_LOGS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**base, **env})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out


@pytest.mark.parametrize(
    "first, env",
    [
        ("import torch\nimport mst_compile\n", {"MST_LOG": "info"}),
        ("import mst_compile\nimport torch\n", {"MST_LOG": "info"}),
        (f"import mst_compile\n{SET_LEVEL}\nimport torch\n", {}),  # the README's snippet before torch
        (f"import torch\nimport mst_compile\n{SET_LEVEL}\n", {}),
        ("import torch\n", {"TORCH_LOGS": "mst"}),
    ],
    ids=["MST_LOG-torch-first", "MST_LOG-mst-first", "setLevel-before-torch", "setLevel-after-torch", "TORCH_LOGS"],
)
def test_one_report_per_compiled_graph_in_any_import_order(first, env):
    out = _run(first + REPORT, **env)
    reports = [line for line in out.stderr.splitlines() if "rewritten, " in line]
    assert len(reports) == 1, out.stderr[-2000:]  # printed, and printed once (one handler)


def test_mst_log_debug_prints_the_report_and_the_graph_after_each_pass():
    out = _run("import mst_compile\n" + COMPILE, MST_LOG="debug")  # a real compile, mst_compile imported first
    assert "after pass" in out.stderr, out.stderr[-2000:]
    assert len([line for line in out.stderr.splitlines() if "rewritten, " in line]) == 1, out.stderr[-2000:]


def test_silent_by_default():
    out = _run("import torch\n" + REPORT)
    assert "rewritten, " not in out.stderr, out.stderr[-2000:]
