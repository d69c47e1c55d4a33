"""mst's command line.

    python -m mst_compile explain --model llama-small --tokens 4096   # what mst would rewrite, without training

The benchmark has its own: ``python -m mst_compile.bench --help``.
"""

from __future__ import annotations

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
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(_model_names())}")


def _model_names() -> list[str]:
    from .bench import models, zoo

    return [*models.CONFIGS, *zoo.ARCHS, "nanogpt"]


explain_doc = """List every candidate region mst finds in one forward of the model (its graph traced by Dynamo,
the passes run, nothing compiled or trained): shapes, chunk count, est. MiB saved, and why each skip happened."""


def main(argv=None) -> int:
    from .bench.cli import HelpFormatter, doc, parser

    p = parser("python -m mst_compile", __doc__)
    sub = p.add_subparsers(dest="cmd", required=True, title="commands")
    e = sub.add_parser("explain", help="list the regions mst would rewrite for a model built from a config",
                       formatter_class=HelpFormatter, description=doc(explain_doc))  # fmt: skip
    sub.metavar = "{" + ",".join(sub.choices) + "}"  # named in the usage line and in a missing-command error
    e.add_argument("--model", default="llama-small", help=f"one of {', '.join(_model_names())} (random weights)")
    e.add_argument("--tokens", type=int, default=4096, help="tokens per call (batch x sequence length)")
    e.add_argument("--batch", type=int, default=1, help="sequences the tokens are split into")
    e.add_argument("--options", default="", help='mst options as JSON, e.g. \'{"num_chunks": 8}\'')
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
