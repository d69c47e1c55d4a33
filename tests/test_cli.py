"""The command lines as a new user meets them (a subprocess each): their help texts, and one clear line naming the
extra to install when an optional dependency is missing."""

import os
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "train_long_context.py")


def _run(args, blocked=(), tmp_path=None, timeout=300):
    """``python ARGS`` from the repository root; each module in ``blocked`` imports as if not installed."""
    env = dict(os.environ)
    if blocked:
        for name in blocked:
            stub = f"raise ModuleNotFoundError('No module named ' + {name!r}, name={name!r})\n"
            (tmp_path / f"{name}.py").write_text(stub)
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def _one_clear_line(out, module, extra):
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert module in lines[0] and f'pip install -e ".[{extra}]"' in lines[0], lines[0]


def test_the_readme_benchmark_extra_brings_the_plot():
    extras = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["optional-dependencies"]
    assert any(dep.startswith("matplotlib") for dep in extras["bench"]), extras["bench"]
    assert 'pip install -e ".[bench]" && python -m mst_compile.bench' in open(os.path.join(ROOT, "README.md")).read()


def test_plot_without_matplotlib_says_which_extra(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    _one_clear_line(_run([EXAMPLE, "--plot", str(runs)], blocked=["matplotlib"], tmp_path=tmp_path), "matplotlib",
                    "bench")  # fmt: skip


def test_benchmark_plot_without_matplotlib_says_which_extra(monkeypatch, caplog):
    from mst_compile.bench import output

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with caplog.at_level("WARNING", logger="mst_compile.bench"):
        assert not output.plot([{"form": "step", "arm": "mst", "tokens": 8, "peak_mib": 1.0}], "unused.png")
    (message,) = [r.getMessage() for r in caplog.records]
    assert "matplotlib" in message and 'pip install -e ".[bench]"' in message, message


@pytest.mark.parametrize("args", [["-m", "mst_compile", "explain", "--model", "llama-tiny", "--tokens", "64"],
                                  ["-m", "mst_compile.bench", "--model", "llama-tiny", "--tokens", "64"]],
                         ids=["explain", "bench"])  # fmt: skip
def test_model_commands_without_transformers_say_which_extra(tmp_path, args):
    _one_clear_line(_run(args, blocked=["transformers"], tmp_path=tmp_path), "transformers", "bench")
