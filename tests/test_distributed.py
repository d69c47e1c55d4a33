"""Real torch.distributed (gloo, CPU, 2 processes): DDP and FSDP2 around a model compiled with mst.

Each rank trains on its half of a global batch; the averaged gradients must equal a single-process run on the
whole batch, every rank must rewrite the same regions with the same chunk counts, and nothing may hang.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow  # two processes per test, each compiling

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch():
    from mst_compile.bench import zoo

    g = torch.Generator().manual_seed(0)
    return torch.randint(3, zoo.V, (WORLD * 2, 20), generator=g)


def _wrap(model, mode, backend, options=None, seen=None):
    """DDP around the compiled model, or FSDP2 per layer + root compiled per layer (torchtitan's way) with the
    README's recipe, ``mst_compile.compile_per_layer``. ``seen``: a list that gets every FSDP2 graph's input
    shapes."""
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return torch.compile(DDP(model), backend=backend, options=options)
    from torch.distributed.fsdp import fully_shard

    import mst_compile

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    if seen is not None:
        inner = torch._dynamo.lookup_backend(backend)

        def backend(gm, example_inputs, options=None, _inner=inner):
            seen.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
            return _inner(gm, example_inputs, options=options) if options is not None else _inner(gm, example_inputs)

    return mst_compile.compile_per_layer(model, backend=backend, options=options)


def _launch(target, *args, timeout=600):
    """Run ``target(rank, port, *args)`` in ``WORLD`` spawned processes; every rank must exit cleanly."""
    ctx, port = mp.get_context("spawn"), _free_port()
    procs = [ctx.Process(target=target, args=(r, port, *args)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
        assert p.exitcode == 0, f"rank exited with {p.exitcode} (hang or crash)"


def _worker(rank, port, mode, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        import mst_compile
        from mst_compile.bench import zoo

        torch.manual_seed(0)
        model = zoo.build("llama")
        ids = _batch().chunk(WORLD)[rank]
        seen = []
        wrapped = _wrap(model, mode, "mst", {"num_chunks": 3}, seen=seen)
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {}
        for n, p in model.named_parameters():
            g = p.grad
            if hasattr(g, "full_tensor"):
                g = g.full_tensor()
            grads[n] = g.detach().clone()
        reports = [[(r.kind, r.status, r.chunks) for r in rep.regions] for rep in mst_compile.reports()]
        torch.save({"loss": loss.detach(), "grads": grads, "reports": reports, "inputs": seen}, os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _single():
    from mst_compile.bench import zoo

    torch.manual_seed(0)
    model = zoo.build("llama")
    ids = _batch()
    # DDP averages the ranks' mean losses; with equal token counts per rank that is the full-batch mean
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_process_training_matches_single_process(tmp_path, mode):
    _launch(_worker, mode, str(tmp_path))
    res = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    ref = _single()
    assert res[0]["reports"] == res[1]["reports"]  # same regions, same chunk counts on every rank
    kinds = [(k, s) for rep in res[0]["reports"] for k, s, _ in rep]
    # DDP: one graph, both layers' MLPs; FSDP2 per layer: the layer graph is compiled once and serves both
    assert kinds.count(("mlp", "rewritten")) == (2 if mode == "ddp" else 1), kinds
    assert kinds.count(("head", "rewritten")) == 1 and not [k for k in kinds if k[1] != "rewritten"], kinds
    # the causal mask: built in the one graph under DDP (proven causal, rewritten); under FSDP2's per-layer compile
    # no graph sees a mask at all (NOTE [per-layer compile and the mask]): HF's eager code passes none
    assert kinds.count(("mask", "rewritten")) == (1 if mode == "ddp" else 0), kinds
    if mode == "fsdp2":
        tokens = _batch().shape[1]
        square = [s for shapes in res[0]["inputs"] for s in shapes if s[-2:] == (tokens, tokens)]
        assert res[0]["inputs"] and not square, res[0]["inputs"]
    for r in res:
        for n, g in ref.items():
            torch.testing.assert_close(r["grads"][n], g, rtol=1e-4, atol=1e-6)





def _memory_worker(rank, port, mode, out):
    """Each rank: the step peak of the model compiled with Inductor, then with mst, same wrapper."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from mst_compile.bench.measure import PeakMeter
        from mst_compile.bench.models import build_llama, token_batch

        ids = token_batch(2048, 8192, seed=rank)
        peaks = {}
        for backend in ("inductor", "mst"):
            model = build_llama("llama-mem")
            run = _wrap(model, mode, backend)
            for i in range(3):  # two warm-up steps, then the measured one
                with PeakMeter() as m:
                    run(input_ids=ids, labels=ids).loss.backward()
                    model.zero_grad(set_to_none=True)
            peaks[backend] = m.peak_mib
            del run, model
        torch.save(peaks, os.path.join(out, f"mem{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_memory_saving_holds_on_every_rank(tmp_path, monkeypatch, mode):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # freed blocks go back to the OS (see bench/measure.py)
    _launch(_memory_worker, mode, str(tmp_path), timeout=900)
    for r in range(WORLD):
        peaks = torch.load(tmp_path / f"mem{r}.pt")
        # measured here, the same on both ranks (2048 tokens per rank): DDP 0.47 (119 vs 250 MiB); FSDP2 with
        # compile_per_layer, both arms, 0.42 (103 vs 244 MiB; 0.58 before the recipe, when every layer graph got
        # HF's tokens x tokens mask)
        assert peaks["mst"] < 0.6 * peaks["inductor"], (r, peaks)
