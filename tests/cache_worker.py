"""One compiled training step of the tiny Llama in a fresh process, for tests/test_cache.py.

    python tests/cache_worker.py OUT.pt BACKEND [--save ARTIFACTS] [--load ARTIFACTS]

The caller sets ``TORCHINDUCTOR_CACHE_DIR`` (and any other compile setting) in the environment. Writes the
compile time of the first step (forward + backward), the loss, the gradients and AOTAutograd's cache counters.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

log = logging.getLogger("mst_compile.tests")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("backend")
    ap.add_argument("--save")
    ap.add_argument("--load")
    a = ap.parse_args()
    import mst_compile  # noqa: F401 - the backend's entry point does not need it; the report does
    from mst_compile.bench import zoo

    if a.load:
        with open(a.load, "rb") as f:
            torch.compiler.load_cache_artifacts(f.read())
    model = zoo.build("llama")
    ids = torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    opts = {"num_chunks": 3} if a.backend == "mst" else None
    step = torch.compile(model, backend=a.backend, options=opts)
    t = time.perf_counter()
    loss = step(input_ids=ids, labels=ids).loss
    loss.backward()
    seconds = time.perf_counter() - t
    if a.save:
        art = torch.compiler.save_cache_artifacts()
        if art is None:
            raise SystemExit("save_cache_artifacts returned nothing")
        with open(a.save, "wb") as f:
            f.write(art[0])
    from mst_compile import _compat

    torch.save({
        "seconds": seconds,
        "loss": loss.detach(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        "aot": dict(_compat.dynamo_counters["aot_autograd"]),
        "inductor": {k: v for k, v in _compat.dynamo_counters["inductor"].items() if k.startswith("fxgraph_cache")},
        "rewritten": int(mst_compile.counters["mlp_rewritten"]) + int(mst_compile.counters["head_rewritten"]),
    }, a.out)  # fmt: skip
    log.info("%s: %.2f s", a.backend, seconds)


if __name__ == "__main__":
    main()
