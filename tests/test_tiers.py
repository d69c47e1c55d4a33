"""The quick tier (``pytest -m "not slow"``, README): the long tests carry the ``slow`` marker, and every pass's
and op's test file keeps tests in the quick tier."""

import glob
import importlib
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: whole files of long tests: memory measured in worker processes, HF Trainer runs, two-process distributed
SLOW_FILES = ["tests.test_memory", "tests.test_distributed", "tests.test_trainer"]
#: long tests elsewhere: the benchmark and the examples in subprocesses, long training loops
SLOW_TESTS = [
    "tests.test_bench:test_bench_smoke",
    "tests.test_bench:test_interrupt_keeps_the_finished_rows_and_stops_the_running_arm",
    "tests.test_examples:test_plain_loop_config_switch",
    "tests.test_examples:test_long_context_example_measures_cpu_peaks_as_the_user_runs_it",
    "tests.test_training_modes:test_adamw_loop_follows_torch_compile",
    "tests.test_architectures:test_more_architectures_compile_exactly",  # the zoo sweep; the core ones stay quick
    "tests.passes.aten.test_recompute_pass:test_end_to_end_tags_both_layers_and_matches_eager",  # through Inductor
    "tests.passes.aten.test_recompute_pass:test_gpt2_end_to_end",
    "tests.passes.aten.test_remat_pass:test_end_to_end_with_hf_checkpointing_matches_eager",
]


def _marks(obj) -> list:
    marks = getattr(obj, "pytestmark", [])
    return marks if isinstance(marks, list) else [marks]


def _slow(module, fn) -> bool:
    return any(m.name == "slow" for m in _marks(module) + _marks(fn))


def _tests(module):
    return [(n, f) for n, f in vars(module).items() if n.startswith("test_") and callable(f)]


@pytest.mark.parametrize("name", SLOW_FILES)
def test_long_test_files_are_slow(name):
    module = importlib.import_module(name)
    assert all(_slow(module, f) for _, f in _tests(module)), [n for n, f in _tests(module) if not _slow(module, f)]


@pytest.mark.parametrize("spec", SLOW_TESTS)
def test_long_tests_are_slow(spec):
    name, test = spec.split(":")
    module = importlib.import_module(name)
    assert _slow(module, getattr(module, test))


def test_every_pass_and_op_keeps_quick_tests():
    files = sorted(glob.glob(os.path.join(ROOT, "tests", "passes", "**", "test_*.py"), recursive=True))
    files += sorted(glob.glob(os.path.join(ROOT, "tests", "ops", "test_*.py")))
    assert files
    for path in files:
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        module = importlib.import_module(name)
        assert any(not _slow(module, f) for _, f in _tests(module)), f"{name} has no test in the quick tier"
