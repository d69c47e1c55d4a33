"""The one-line use on an HF Llama built from a config (random weights, nothing downloaded): a few AdamW steps
of the compiled model, then the report of what mst rewrote.

    python examples/quickstart.py [--tokens 2048] [--backend mst|inductor] [--steps 3]
"""

import logging

import torch

import mst_compile
from mst_compile.bench.cli import parser
from mst_compile.bench.deps import require

require("transformers", "the example's model")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

p = parser("python examples/quickstart.py", __doc__)
p.add_argument("--tokens", type=int, default=2048, help="tokens per step (one sequence)")
p.add_argument("--backend", default="mst", help="torch.compile backend (mst, inductor, ...)")
p.add_argument("--steps", type=int, default=3, help="training steps")
a = p.parse_args()
logging.basicConfig(level=logging.WARNING)

cfg = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=32000, use_cache=False)  # fmt: skip
model = LlamaForCausalLM(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
compiled = torch.compile(model, backend=a.backend)  # the one line
ids = torch.randint(0, cfg.vocab_size, (1, a.tokens))
for step in range(a.steps):
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    logging.warning("step %d loss %.4f", step, loss.item())
if a.backend == "mst":
    logging.warning("%s", mst_compile.last_report())
