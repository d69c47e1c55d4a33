"""A plain PyTorch training loop where mst is one switch of the run's config.

    python examples/plain_loop.py                                  # the config below: backend "mst"
    python examples/plain_loop.py --set compile.backend=inductor   # the same loop on plain Inductor (A/B)
    python examples/plain_loop.py --set compile.options.chunk_memory_mib=16
    MST_NUM_CHUNKS=8 python examples/plain_loop.py                 # mst options can also come from MST_* variables

The model is any ``nn.Module`` (here an HF Llama built from a config, random weights); nothing in it changes.
The only mst-specific line is the ``torch.compile`` call, and the backend name comes from the config.
"""

from __future__ import annotations

import copy
import json

import torch

from mst_compile.bench.cli import parser
from mst_compile.bench.deps import require

CONFIG = {
    "model": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 4, "vocab_size": 256},  # fmt: skip
    "train": {"context": 1024, "steps": 20, "lr": 1e-3, "seed": 0},
    # the switch: "mst" | "inductor" | "eager" (no compile); options go to the backend as torch.compile(options=)
    "compile": {"backend": "mst", "options": {}},
}


def _set(cfg: dict, assignment: str) -> None:
    """``a.b.c=value`` (value parsed as JSON when it can be) into the nested config."""
    path, raw = assignment.split("=", 1)
    *parents, leaf = path.split(".")
    for p in parents:
        cfg = cfg.setdefault(p, {})
    try:
        cfg[leaf] = json.loads(raw)
    except json.JSONDecodeError:
        cfg[leaf] = raw


def build(cfg: dict):
    require("transformers", "the example's model")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg["train"]["seed"])
    model = LlamaForCausalLM(LlamaConfig(**cfg["model"], use_cache=False))
    c = cfg["compile"]
    if c["backend"] == "eager":
        return model, model
    return model, torch.compile(model, backend=c["backend"], options=c["options"] or None)


def train(cfg: dict) -> list[float]:
    from train_long_context import stdlib_bytes  # the same real text: the standard library's sources, as bytes

    model, run = build(cfg)
    t = cfg["train"]
    data = stdlib_bytes(8 << 20)
    opt = torch.optim.AdamW(model.parameters(), lr=t["lr"])
    g = torch.Generator().manual_seed(t["seed"])
    losses = []
    for step in range(t["steps"]):
        start = int(torch.randint(0, len(data) - t["context"] - 1, (1,), generator=g))
        ids = data[start : start + t["context"]].long().unsqueeze(0)
        loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        print(f"step {step:3d}  loss {losses[-1]:.4f}", flush=True)
    return losses


def main(argv=None) -> list[float]:
    p = parser("python examples/plain_loop.py", __doc__,
               epilog="the config (--set a.b=value changes one entry; values are read as JSON when they parse):\n"
               + json.dumps(CONFIG, indent=2))  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry, e.g. train.steps=5 (repeatable)")
    a = p.parse_args(argv)
    cfg = copy.deepcopy(CONFIG)
    for s in a.set:
        _set(cfg, s)
    losses = train(cfg)
    if cfg["compile"]["backend"] == "mst":
        import mst_compile

        print(mst_compile.last_report())  # what was rewritten, with how many chunks
    return losses


if __name__ == "__main__":
    main()
