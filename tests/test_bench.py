"""The benchmark tool runs end to end (tiny model): every arm in its own process, a table and result files."""

import json
import subprocess
import sys


def test_bench_smoke(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mst_compile.bench", "--model", "llama-tiny", "--tokens", "256", "--steps", "1",
         "--arms", "compile,mst,paper", "--forms", "step", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.load(open(tmp_path / "results.json"))
    assert [r["arm"] for r in rows] == ["compile", "mst", "paper"]
    assert all("peak_mib" in r for r in rows), rows
    assert rows[1]["rewritten"] == 3
    assert abs(rows[1]["loss"] - rows[0]["loss"]) < 1e-4 * rows[0]["loss"]  # same model, same tokens
    assert "peak/compile" in out.stdout and (tmp_path / "results.csv").exists()


def test_ablate_spec():
    from mst_compile.bench.__main__ import _ablations

    assert _ablations("8,16") == [{"num_chunks": 8}, {"num_chunks": 16}]
    assert _ablations("min_chunk_tokens=128,4") == [{"min_chunk_tokens": 128}, {"num_chunks": 4}]
    assert _ablations("") == []
