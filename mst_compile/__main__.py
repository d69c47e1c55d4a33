"""Command line: ``python -m mst_compile explain --model llama-small --tokens 4096``."""

from __future__ import annotations

import argparse
import json
import sys

import torch


def _build(name: str):
    from .bench import models, zoo
    from .bench.deps import require

    if name != "nanogpt":
        require("transformers", f"the model {name!r}")
    if name in models.CONFIGS:
        return models.build_llama(name)
    if name in zoo.ARCHS or name == "nanogpt":
        return zoo.build(name, scale=8, vocab=32000)
    raise SystemExit(f"unknown model {name!r}; choose from {sorted(models.CONFIGS) + sorted(zoo.ARCHS) + ['nanogpt']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mst_compile")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("explain", help="list the regions mst would rewrite for a model built from a config")
    e.add_argument("--model", default="llama-small", help="a bench config (llama-small, ...) or a zoo architecture")
    e.add_argument("--tokens", type=int, default=4096)
    e.add_argument("--batch", type=int, default=1)
    e.add_argument("--options", default="", help="JSON dict of mst options")
    a = p.parse_args(argv)
    from . import explain

    model = _build(a.model)
    vocab = model.config.vocab_size if hasattr(model, "config") else model.lm_head.out_features
    ids = torch.randint(0, vocab, (a.batch, a.tokens // a.batch))
    opts = json.loads(a.options) if a.options else None
    if hasattr(model, "config"):
        res = explain(model, options=opts, input_ids=ids, labels=ids)
    else:
        res = explain(model, ids, ids, options=opts)
    sys.stdout.write(str(res) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
