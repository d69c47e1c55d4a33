"""The benchmark tool runs end to end (tiny model): every arm in its own process, a table and result files."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import mst_compile

BENCH = [sys.executable, "-m", "mst_compile.bench", "--model", "llama-tiny", "--steps", "1", "--forms", "step"]


def _children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (Linux ``/proc``)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_bench_smoke(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mst_compile.bench", "--model", "llama-tiny", "--tokens", "1024", "--steps", "1",
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


@pytest.mark.slow
def test_interrupt_keeps_the_finished_rows_and_stops_the_running_arm(tmp_path):
    """Each finished row is in results.json and table.txt as it lands; Ctrl-C (SIGINT to the benchmark alone,
    so it must stop the arm's process itself) ends the run cleanly, keeping and printing what finished."""
    args = BENCH + ["--tokens", "128", "--warmup", "1", "--arms", "eager,compile", "--out", str(tmp_path)]
    # SIGINT at its default in the benchmark whatever the test runner's worker inherited (a background shell, a
    # test worker may ignore it)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    results, deadline = tmp_path / "results.json", time.time() + 600
    try:
        while True:  # the eager row has landed and the compile arm's process is running
            assert proc.poll() is None, "the run ended before it could be interrupted: " + proc.communicate()[1][-2000:]
            assert time.time() < deadline
            workers = _children(proc.pid)
            if results.exists() and workers:
                break
            time.sleep(0.2)
        assert [r["arm"] for r in json.loads(results.read_text())] == ["eager"]
        assert "eager" in (tmp_path / "table.txt").read_text()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted" in err, err[-2000:]
    assert "eager" in out and "compile" not in out.split("\n", 2)[2], out  # the finished row's table
    assert [r["arm"] for r in json.loads(results.read_text())] == ["eager"]
    time.sleep(0.5)
    assert not any(_alive(w) for w in workers), workers


def test_ablate_spec():
    from mst_compile.bench.__main__ import _ablations

    assert _ablations("8,16") == [{"num_chunks": 8}, {"num_chunks": 16}]
    assert _ablations("min_chunk_tokens=128,4") == [{"min_chunk_tokens": 128}, {"num_chunks": 4}]
    assert _ablations("causal_mask=0,recompute=none") == [{"causal_mask": False}, {"recompute": "none"}]
    assert _ablations("") == []
    assert _ablations("causal_mask=0+compile_bodies=always,4") == [{"causal_mask": False, "compile_bodies": "always"},
                                                                  {"num_chunks": 4}]


def test_cap_search_doubles_then_bisects():
    """A fake arm whose peak is 1 MiB per token: under a 700 MiB cap the search finds 640 from 128 (doubling to
    1024, then 768 and 640 at a quarter of --cap-start); each length is measured once."""
    from types import SimpleNamespace

    from mst_compile.bench.search import longest_under_cap

    calls = []

    def measure(arm, form, n, a):
        calls.append(n)
        return {"peak_mib": float(n)}

    a = SimpleNamespace(cap_start=128, cap_max=4096, cap_mib=700)
    (row,) = longest_under_cap(["x"], ["step"], a, measure)
    assert (row["longest"], row["first_over"]) == (640, 768)
    assert calls == [128, 256, 512, 1024, 768, 640]


def test_floor_follows_the_recompute_mode():
    """NOTE [selective recompute] in the floor: ``norms`` drops two norm outputs per layer, ``attention`` also
    q, k, v per layer but keeps one layer's (alive again during its attention backward)."""
    from mst_compile.bench.floor import floor_mib
    from mst_compile.bench.models import CONFIGS, build_llama

    c = CONFIGS["llama-tiny"]
    model, tokens, h, layers = build_llama("llama-tiny"), 1024, c["hidden_size"], c["num_hidden_layers"]
    qkv = tokens * (h + 2 * c["num_key_value_heads"] * h // c["num_attention_heads"]) * 4 / 2**20
    none, norms, att = (floor_mib(model, tokens, recompute=m) for m in ("none", "norms", "attention"))
    assert none - norms == pytest.approx(layers * 2 * tokens * h * 4 / 2**20)
    assert norms - att == pytest.approx((layers - 1) * qkv)


_LINETRACE = """
import json, torch
from mst_compile.bench.linetrace import report, trace_step
f = torch.compile(lambda x: (x + 1.0) * 2.0)
x = torch.randn(8 * 2**20)
f(x)
out = []
rec = trace_step(lambda: out.append(f(x)))
print(json.dumps({"paths": [p for _, p, _ in rec], "peak": max(m for m, _, _ in rec), "report": report(rec)}))
"""


def test_linetrace_finds_the_allocation_in_generated_code():
    """``bench.linetrace``: RSS per line of Inductor's generated code; a 32 MiB output buffer is the peak. In a
    process of its own with the tool's documented allocator setting: in a worker that already ran other tests,
    freed heap can hold the buffer without the RSS growing."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run([sys.executable, "-c", _LINETRACE], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["paths"] and all("torchinductor" in path for path in got["paths"])
    assert got["peak"] >= 24 * 2**20, got["peak"]
    assert got["report"].startswith("peak ")


def _rows():
    """Two forms and three arms, as the benchmark writes them (eager without a step time, as in docs/bench)."""
    rows = []
    for form, arms in (("step", ("eager", "compile", "mst")), ("model", ("compile", "mst"))):
        for tokens in (2048, 4096, 8192, 16384, 36864, 40960):
            for i, arm in enumerate(arms):
                rows.append(dict(form=form, tokens=tokens, arm=arm, peak_mib=tokens / (i + 1) / 10,
                                 step_s_median=float("nan") if arm == "eager" else 1.0, floor_mib=tokens / 40,
                                 **({"rewritten": 3, "masks_rewritten": 1} if arm == "mst" else {})))  # fmt: skip
    return rows


def test_table_has_blanks_not_nan_and_names_the_estimate_for_what_it_is():
    from mst_compile.bench.output import add_ratios, table

    rows = _rows()
    add_ratios(rows)
    text = table(rows)
    assert "nan" not in text.lower(), text
    head = text.splitlines()[0]
    assert "floor" not in head and "estimate" in head, head  # measured peaks go below it: not a floor
    assert "not all alive at once" in text
    assert "1 mask" in text and "1 masks" not in text


def test_plot_one_style_per_arm_legend_outside_readable_ticks(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from mst_compile.bench.output import plot

    saved = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), original(fig, *a, **k))[1])
    assert plot(_rows(), str(tmp_path / "p.png"))
    (fig,) = saved
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # the closed figure lost its canvas
    canvas.draw()
    renderer = canvas.get_renderer()
    style = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            key = (line.get_color(), line.get_marker(), line.get_linestyle())
            assert style.setdefault(line.get_label(), key) == key, line.get_label()  # same arm, same look
    assert len({style[a] for a in ("eager", "compile", "mst")}) == 3
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + list(fig.legends)
    assert legends
    for legend in legends:
        box = legend.get_window_extent(renderer)
        assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes), "legend covers a panel"
    for ax in fig.axes:
        labels = [t for t in ax.get_xticklabels(which="both") if t.get_visible() and t.get_text()]
        lo, hi = ax.get_xlim()
        boxes = [t.get_window_extent(renderer) for t in labels if lo <= t.get_position()[0] <= hi]
        assert len(boxes) >= 2
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :]), "x tick labels collide"


@pytest.mark.slow
def test_gpu_check_runs_its_parity_rows_on_the_cpu():
    """The GPU check's own code runs (``--device cpu --small``): its table and its verdict. Each parity row ran
    mst's chunks, not Inductor's whole regions (NOTE [parity runs the chunks]): both MLPs and the head of each
    model chunked, their bodies compiled as on a GPU, none fell back to op by op."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "mst_compile.bench.gpu_check", "--device", "cpu", "--small",
                          "--skip-regions"], capture_output=True, text=True, timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "parity nanogpt bf16-params" in out.stdout and "all checks pass" in out.stdout
    rows = [json.loads(x) for x in out.stdout.splitlines() if x.startswith('{"check"')]
    assert [r["check"] for r in rows] == ["parity llama-tiny bf16-params", "parity llama-tiny autocast",
                                          "parity nanogpt bf16-params", "parity nanogpt autocast"]  # fmt: skip
    assert all(r["chunked (mlp/head)"] == "2/1" and r["bodies not compiled"] == 0 for r in rows), rows
    # each row compiles what it runs: the MLP body (forward, and the recompute under grad) and the chunk
    # cross-entropy of its bf16 logits
    assert [r["bodies compiled (mlp/head)"] for r in rows] == ["2/1"] * 4, rows


def test_gpu_check_names_the_rows_its_budget_skips(capsys):
    """A check cut short by its time budget still ends with a verdict and names every row it did not run."""
    from mst_compile.bench import gpu_check

    assert gpu_check.main(["--device", "cpu", "--small", "--budget-s", "0"]) == 0
    out = capsys.readouterr().out
    assert "skipped after the 0 s budget: ['parity llama-tiny bf16-params', 'parity llama-tiny autocast', " in out
    assert "'head 256 tokens: mst, 8 chunks, bodies op by op']" in out


def test_gpu_check_starts_no_row_the_longest_so_far_would_carry_past_its_budget(monkeypatch):
    """The budget counts from the process's start, and a row is not started when one as long as the longest so
    far would end past it (a row is never cut off: a long row begun near the end would overrun the lease)."""
    from mst_compile.bench import gpu_check

    assert 0 < gpu_check._process_age() < 3600
    now = [100.0]
    monkeypatch.setattr(gpu_check.time, "perf_counter", lambda: now[0])
    rows = gpu_check.Rows(budget_s=30, start=95.0)  # the process started 5 s before
    assert not rows.over("a")
    now[0] = 110.0
    rows.add({"check": "a", "ok": True})  # 10 s: 15 s in, 25 s expected with the next row
    assert not rows.over("b")
    now[0] = 116.0
    assert rows.over("b") and rows.skipped == ["b"]  # 21 s in: a 10 s row would end at 31 s


def test_a_gpu_check_row_whose_bodies_fell_back_is_not_ok():
    """A row during which a compiled body fell back to op by op neither checked nor timed the code it names."""
    from mst_compile.bench import gpu_check
    from mst_compile.report import counters

    rows = gpu_check.Rows()
    rows.add({"check": "a", "ok": True})
    counters["bodies_not_compiled"] += 1
    rows.add({"check": "b", "ok": True})
    rows.add({"check": "c", "ok": True})
    assert [(r["bodies not compiled"], r["ok"]) for r in rows] == [(0, True), (1, False), (0, True)]


def test_gpu_check_reports_a_failing_row_and_goes_on(monkeypatch, capsys):
    """One row raising (an out-of-memory, a compile error) is a failed row in the table, and the rows after it
    still run: a short lease of a GPU is not lost to the first error."""
    import json

    from mst_compile.bench import gpu_check

    def fails_once(device, tokens, build, loss_fn, precision, cudagraphs):
        if precision == "bf16-params":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore text")
        return {"ok": True}

    monkeypatch.setattr(gpu_check, "_parity_row", fails_once)
    assert gpu_check.main(["--device", "cpu", "--small", "--skip-regions"]) == 1
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert lines[0] == {"setting": {"fp32-output GEMM": False, "triton": lines[0]["setting"]["triton"]}}
    assert [(r["check"], r["ok"], r.get("error")) for r in lines[1:]] == [
        ("parity llama-tiny bf16-params", False, "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"),
        ("parity llama-tiny autocast", True, None),
        ("parity nanogpt bf16-params", False, "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"),
        ("parity nanogpt autocast", True, None)]  # fmt: skip


@pytest.mark.slow
def test_gpu_check_region_rows_run_on_the_cpu():
    """The timing half of the GPU check runs too (tiny shapes, one length): every arm, and the rows say which arm
    chunked the region (the fixed-chunk arms do, NOTE [fixed-chunk arms]; on these shapes the automatic plan leaves
    both whole)."""
    from mst_compile.bench import gpu_check
    from mst_compile.ops import accumulate

    rows = gpu_check.region_rows("cpu", small=True, steps=1, lengths=(256,))
    chunked = {r["check"]: r["chunked"] for r in rows}
    assert chunked == {"mlp 256 tokens: torch.compile": "no", "mlp 256 tokens: mst": "no",
                       "mlp 256 tokens: mst, 4 chunks": "yes",
                       "mlp 256 tokens: mst, 4 chunks, no fp32-out GEMM": "yes",
                       "mlp 256 tokens: mst, 4 chunks, bodies op by op": "yes",
                       "head 256 tokens: torch.compile": "no", "head 256 tokens: mst": "no",
                       "head 256 tokens: mst, 8 chunks": "yes",
                       "head 256 tokens: mst, 8 chunks, no fp32-out GEMM": "yes",
                       "head 256 tokens: mst, 8 chunks, bodies op by op": "yes"}  # fmt: skip
    assert accumulate.FP32_OUTPUT_GEMM and all(float(r["fwd+bwd ms"]) > 0 for r in rows)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_gpu_check_on_cuda():
    from mst_compile.bench import gpu_check

    assert gpu_check.main(["--device", "cuda", "--small"]) == 0


def test_chunk_cost_counts_what_each_chunk_of_the_ops_launches():
    """Device-independent chunk cost (``bench.chunk_cost``), counted exactly from the ops' aten calls. The
    numbers are today's code; a change to the chunk bodies shows here first."""
    from mst_compile.bench.chunk_cost import mst_costs

    c = mst_costs(rows=32, h=16, i=48, v=100, chunks=3)
    fwd, bwd, head = c["mlp forward"], c["mlp backward"], c["head forward+backward"]
    # the forward: gate, up, the middle (silu, mul), the exit GEMM written into its rows (no copy); the
    # backward: the same recompute, the middle's backward under autograd and every GEMM of the op's own
    # (NOTE [entry projections]): 13, where autograd's projections made it 17
    assert (fwd.launches, bwd.launches, head.launches, head.big_passes) == (5, 13, 25, 12), (
        fwd.ops, bwd.ops, head.ops)  # fmt: skip
    assert "copy_" not in fwd.ops
    # a softcap between the projection and the loss, op by op: the tail and the cross-entropy under autograd
    sc = c["softcap head forward+backward"]
    assert (sc.launches, sc.big_passes) == (18, 24), sc.ops
    # bytes: at least every chunk's input rows and weights read once
    assert fwd.bytes >= (32 * 16 + 2 * 48 * 16 + 48 * 16) * 4


def test_chunk_cost_of_compiled_bodies_counts_inductor_kernels():
    """With the bodies as Inductor code (NOTE [compiled bodies]) the profiler's named kernels count as launches:
    the SwiGLU forward is 3 GEMMs and one fused kernel; the head's cross-entropy is one kernel, and the aten ops
    touch a chunk's ``[rows, vocab]`` logits 3 times (the GEMMs that write them and read their gradient; what
    the kernel itself reads and writes is not seen)."""
    from mst_compile.bench.chunk_cost import mst_costs

    c = mst_costs(rows=32, h=16, i=48, v=100, chunks=3, dtype=torch.bfloat16, compiled=True)
    fwd, bwd, head = c["mlp forward"], c["mlp backward"], c["head forward+backward"]
    # bf16 weights on the CPU: each weight-gradient GEMM is a bf16 one and an fp32 add or copy (NOTE
    # [weight-gradient accumulation]), so 14 where a GPU's fp32-output GEMMs need 10
    assert (fwd.launches, fwd.kernels, bwd.launches, bwd.kernels) == (4, 1, 14, 2), (fwd.ops, bwd.ops)
    assert (head.launches, head.kernels, head.big_passes) == (10, 1, 3), head.ops
    # the softcap tail, its cross-entropy and their gradient: two kernels (forward, backward), where op by op
    # makes 22 launches and 28 passes over the logits
    sc = c["softcap head forward+backward"]
    assert (sc.launches, sc.kernels, sc.big_passes) == (12, 2, 3), sc.ops
    c = mst_costs(rows=32, h=16, i=48, v=100, chunks=3, compiled=True)
    sc = c["softcap head forward+backward"]
    assert (sc.launches, sc.kernels, sc.big_passes) == (10, 2, 3), sc.ops
    # fp32 logits: the kernel writes the gradient over the logits (no [rows, vocab] temporary)
    head = c["head forward+backward"]
    assert (head.launches, head.kernels, head.big_passes) == (8, 1, 3), head.ops
    # the SwiGLU backward at the target: 2 recomputed projections, 2 kernels (the middle and its backward), the
    # exit's 2 GEMMs, 2 weight-gradient GEMMs into their accumulators and 2 for the input's gradient, written
    # into its rows: no copy, no add
    bwd = c["mlp backward"]
    assert (bwd.launches, bwd.kernels) == (10, 2) and not {"copy_", "add_", "add"} & set(bwd.ops), bwd.ops


def test_default_run_is_the_headline_and_full_is_every_arm():
    from mst_compile.bench.__main__ import HEADLINE, selected_arms
    from mst_compile.bench.worker import ARMS, EXTRA_ARMS

    assert selected_arms(None, False) == list(HEADLINE) == ["compile", "mst", "linear_ce"]
    assert selected_arms(None, True) == selected_arms("all", False) == list(ARMS + EXTRA_ARMS)
    assert selected_arms("eager,mst", True) == ["eager", "mst"]


def test_the_estimate_counts_an_mlp_chunk_as_the_pass_does():
    """The floor's MLP bytes per token are the MLP pass's (the report's bytes saved over its chunk count)."""
    from mst_compile.bench import zoo
    from mst_compile.bench.floor import mlp_row_bytes
    from tests.conftest import regions, rewrite

    model = zoo.build("llama")
    ids = torch.randint(3, 320, (2, 24))
    with torch.no_grad():
        _, ctx, _ = rewrite(lambda i: model(input_ids=i, labels=i).loss, ids, config=mst_compile.MSTConfig(num_chunks=3))
    mlps = regions(ctx, "mlp", "rewritten")
    assert len(mlps) == 2
    for r in mlps:
        assert r.bytes_saved == int(48 * mlp_row_bytes(zoo.I, 4) * (1 - 1 / 3)), r


def test_alternate_interleaves_the_arms_and_takes_the_ratio_pair_by_pair():
    from unittest import mock

    from mst_compile.bench import alternate

    calls, clock = [], iter(range(1000))

    def arm(name, cost):
        def step():
            calls.append(name)
            for _ in range(cost - 1):
                next(clock)
        return step

    with mock.patch.object(alternate.time, "perf_counter", lambda: next(clock)):
        res = alternate.alternate(arm("a", 2), arm("b", 3), pairs=4, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then the order flips each pair
    assert res["ratios"] == [1.5] * 4 and res["a_s"] == [2] * 4 and res["ratio_ci95"] == (1.5, 1.5), res


def test_alternate_gives_an_interval_for_the_median_ratio_that_narrows_with_more_pairs():
    from mst_compile.bench.alternate import median_interval

    assert median_interval([1.04] * 9) == (1.04, 1.04)
    few = [0.90, 1.00, 1.05, 1.10, 1.20] * 2
    lo, hi = median_interval(few)
    assert min(few) <= lo < 1.05 < hi <= max(few), (lo, hi)
    assert median_interval(few) == (lo, hi)  # seeded: the same numbers print the same interval
    lo_many, hi_many = median_interval(few * 10)
    assert lo <= lo_many and hi_many <= hi and hi_many - lo_many < hi - lo, (lo_many, hi_many)


def test_gemms_reads_each_operands_layout_from_the_profilers_trace():
    """``bench gemms``: ``N`` for an operand with contiguous rows, ``T`` for a transposed view, the two operands
    of ``addmm_`` after what it adds into; one row per op, shapes, layouts and dtype, with its call count."""
    from mst_compile.bench.gemms import profile_step

    a, b, c = torch.randn(8, 16), torch.randn(4, 16), torch.randn(16, 4)
    acc = torch.zeros(16, 4)

    def step():
        a @ b.t()
        a @ b.t()
        a.t() @ torch.randn(8, 4)
        a @ c
        acc.addmm_(a.t(), torch.randn(8, 4))

    _, rows = profile_step(step)
    got = {(r["op"], r["a"], r["b"], r["layout"], r["calls"]) for r in rows}
    assert got == {("mm", (8, 16), (16, 4), "NT", 2), ("mm", (16, 8), (8, 4), "TN", 1),
                   ("mm", (8, 16), (16, 4), "NN", 1), ("addmm_", (16, 8), (8, 4), "TN", 1)}, rows  # fmt: skip
    assert all(r["dtype"] == "float" and r["seconds"] >= 0 for r in rows)


@pytest.mark.slow
def test_gemms_sees_the_chunked_heads_gemms_in_a_compiled_step():
    """Inside mst's ops too: two chunks of the head make two logits GEMMs of half the rows, and the first chunk's
    weight gradient is written (``mm``), the second's added in place (``addmm_``: NOTE [weight-gradient
    accumulation])."""
    from mst_compile.bench.gemms import profile_step
    from mst_compile.bench.worker import build_step

    model, step = build_step("mst", "step", "llama-tiny", 64, '{"num_chunks": 2}')
    step()
    _, rows = profile_step(step)
    h, v = model.config.hidden_size, model.config.vocab_size
    by_key = {(r["op"], r["a"], r["b"], r["layout"]): r["calls"] for r in rows}
    assert by_key[("mm", (32, h), (h, v), "NT")] == 2, rows  # the logits, chunk by chunk
    assert by_key[("mm", (v, 32), (32, h), "TN")] == 1 and by_key[("addmm_", (v, 32), (32, h), "TN")] == 1, rows
