"""The command lines as a new user meets them (a subprocess each): their help texts, and one clear line naming the
extra to install when an optional dependency is missing."""

import os
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "train_long_context.py")


def _run(args, blocked=(), tmp_path=None, timeout=300, columns="80"):
    """``python ARGS`` from the repository root; each module in ``blocked`` imports as if not installed."""
    env = dict(os.environ, COLUMNS=columns)
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


def test_ci_runs_the_readme_test_command():
    """CI runs the README's test command: the same pytest arguments, and the test extra brings the workers."""
    import re

    readme = open(os.path.join(ROOT, "README.md")).read()
    (cmd,) = re.findall(r'pip install -e "\.\[test\]" && python -m pytest ([^\n]*)', readme)
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    (ci_cmd,) = re.findall(r"python -m pytest ([^\n]*)", ci)
    assert ci_cmd.replace(" -p no:cacheprovider", "") == cmd, (ci_cmd, cmd)
    extras = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["optional-dependencies"]
    assert "-n" not in cmd.split() or any(d.startswith("pytest-xdist") for d in extras["test"]), extras["test"]


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


@pytest.fixture
def wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at the terminal's width, and inside words at hyphens


def _help(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


def test_benchmark_help_lists_the_arms_models_and_defaults(capsys, wide):
    from mst_compile.bench.__main__ import main
    from mst_compile.bench.models import CONFIGS
    from mst_compile.bench.worker import ARMS, EXTRA_ARMS

    text = " ".join(_help(main, ["--help"], capsys).split())  # argparse wraps lines
    assert all(arm in text for arm in ARMS + EXTRA_ARMS), text
    assert all(name in text for name in CONFIGS), text
    assert "(default: llama-small)" in text and "(default: 2048)" in text and "(default: bench_out)" in text, text


def test_explain_help_lists_the_models_and_the_usage_names_the_subcommand(capsys, wide):
    from mst_compile.__main__ import main
    from mst_compile.bench import zoo
    from mst_compile.bench.models import CONFIGS

    text = " ".join(_help(main, ["explain", "--help"], capsys).split())
    assert all(name in text for name in [*CONFIGS, *zoo.ARCHS]), text
    assert "(default: 4096)" in text, text
    top = _help(main, ["--help"], capsys)
    assert top.startswith("usage: python -m mst_compile [-h] {explain}"), top
    with pytest.raises(SystemExit):
        main([])
    err = capsys.readouterr().err
    assert "explain" in err.splitlines()[-1], err  # the missing argument is named by its choices, not "cmd"


def test_long_context_example_help_states_its_defaults_in_whole_sentences():
    out = _run([EXAMPLE, "--help"], columns="1000")
    assert out.returncode == 0, out.stderr[-2000:]
    text = " ".join(out.stdout.split())
    assert "(default: 16384)" in text and "(default: 200)" in text and "(default: mst)" in text, text
    assert "16384 tokens x 200 steps" in text, text  # what a run without arguments does, said up front
    description = text.split("options:")[0].split("[--plot FOLDER]")[1]
    assert "standard library's own source files" in description, description  # not cut mid-sentence
    assert description.strip().endswith((".", ":")), description
