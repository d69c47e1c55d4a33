"""Train a small Llama-style model on real text at a long context: the Python standard library's own source
files (they ship with every Python), read with a byte-level tokenizer, so nothing is downloaded.

Without arguments it trains with mst on 16384 tokens x 200 steps (hidden 256, 2 layers): a long run on a CPU,
where --context 2048 --steps 20 is a quick first try.

    python examples/train_long_context.py --backend mst --context 16384 --steps 200
    python examples/train_long_context.py --backend inductor --context 16384 --steps 200 --out runs/
    python examples/train_long_context.py --plot runs/        # loss curves + peak memory of the runs in runs/

Prints per-step loss, tokens/s and the step's peak memory (RSS high-water mark above the step's start on CPU,
measured with ``MALLOC_MMAP_THRESHOLD_=65536``, which the script sets by running itself again when it is not set;
max allocated on GPU), with a progress bar; writes ``<out>/<backend>-<context>.json``; ``--plot`` draws a PNG
(needs matplotlib, in the ``bench`` extra).
"""

from __future__ import annotations

import glob
import json
import os
import sys
import sysconfig
import time

#: glibc's malloc keeps freed blocks below its (growing) mmap threshold for reuse, so the resident-set high-water
#: mark of a step does not grow when it reuses what the steps before it freed: without this variable a CPU step
#: peak reads near 0 (measured 0 vs 28 MiB, eager, 2048 tokens, --hidden 64). glibc reads it at process start.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _reexec_for_measurement() -> None:
    """Run this script again with ``MALLOC_ENV`` set when it is not (CPU peaks are only right with it)."""
    no_training = {"--plot", "-h", "--help"} & set(sys.argv)
    if __name__ == "__main__" and not no_training and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        args = getattr(sys, "orig_argv", [sys.executable, *sys.argv])[1:]  # keeps interpreter flags
        os.execve(sys.executable, [sys.executable, *args], {**os.environ, **MALLOC_ENV})


_reexec_for_measurement()

import torch  # noqa: E402

from mst_compile.bench.cli import parser  # noqa: E402
from mst_compile.bench.deps import require  # noqa: E402
from mst_compile.bench.measure import PeakMeter  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


def stdlib_bytes(limit: int = 64 << 20) -> torch.Tensor:
    """The standard library's ``.py`` files, concatenated, as a uint8 tensor (byte-level tokens 0..255)."""
    root = sysconfig.get_paths()["stdlib"]
    chunks, total = [], 0
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        if "site-packages" in path:
            continue
        with open(path, "rb") as f:
            data = f.read()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


def train(a) -> dict:
    require("transformers", "the example's model")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(a.seed)
    data = stdlib_bytes()
    cfg = LlamaConfig(vocab_size=256, hidden_size=a.hidden, intermediate_size=4 * a.hidden, num_hidden_layers=a.layers,
                      num_attention_heads=a.hidden // 64, num_key_value_heads=a.hidden // 64,
                      max_position_embeddings=a.context, use_cache=False)  # fmt: skip
    model = LlamaForCausalLM(cfg).to(a.device)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    run = model if a.backend == "eager" else torch.compile(model, backend=a.backend)
    g = torch.Generator().manual_seed(a.seed)
    log = {"backend": a.backend, "context": a.context, "loss": [], "tokens_per_s": [], "peak_mib": []}
    steps = range(a.steps)
    bar = tqdm(steps, desc=f"{a.backend} @ {a.context}") if tqdm else steps
    for step in bar:
        start = int(torch.randint(0, len(data) - a.context - 1, (1,), generator=g))
        ids = data[start : start + a.context].long().unsqueeze(0).to(a.device)
        t = time.perf_counter()
        with PeakMeter(a.device) as meter:  # this step's peak above what was allocated before it
            loss = run(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        log["loss"].append(loss.item())
        log["tokens_per_s"].append(a.context / dt)
        log["peak_mib"].append(meter.peak_mib)
        if tqdm:
            peak = f"{log['peak_mib'][-1]:.0f}M"
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{a.context / dt:.0f}", peak=peak)
    return log


def steady_peak(log: dict) -> float:
    """The median step peak after the first two steps (the first one compiles)."""
    peaks = log["peak_mib"][2:] or log["peak_mib"]
    return sorted(peaks)[len(peaks) // 2]


def plot(folder: str) -> str:
    matplotlib = require("matplotlib", "--plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(folder, "*.json")))]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        ax1.plot(r["loss"], label=f"{r['backend']} @ {r['context']}")
    ax1.set(xlabel="step", ylabel="loss", title="training loss")
    ax1.legend()
    labels = [f"{r['backend']}\n{r['context']}" for r in runs]
    ax2.bar(labels, [steady_peak(r) for r in runs])
    ax2.set(ylabel="peak MiB of a step (median after warm-up)", title="peak memory")
    out = os.path.join(folder, "long_context.png")
    fig.tight_layout()
    fig.savefig(out)
    return out


def main() -> None:
    p = parser("python examples/train_long_context.py", __doc__)
    p.add_argument("--backend", default="mst", choices=["mst", "inductor", "eager"],
                   help="torch.compile backend, or eager (no compile)")
    p.add_argument("--context", type=int, default=16384, help="tokens per step (one sequence)")
    p.add_argument("--steps", type=int, default=200, help="training steps")
    p.add_argument("--hidden", type=int, default=256, help="hidden size, a multiple of 64 (64 per attention head)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of the text windows")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--out", default="runs", help="folder for the run's <backend>-<context>.json")
    p.add_argument("--plot", metavar="FOLDER", help="only draw the PNG of the runs saved in FOLDER")
    a = p.parse_args()
    if a.plot:
        print(plot(a.plot))
        return
    os.makedirs(a.out, exist_ok=True)
    log = train(a)
    path = os.path.join(a.out, f"{a.backend}-{a.context}.json")
    with open(path, "w") as f:
        json.dump(log, f)
    print(f"final loss {log['loss'][-1]:.4f}, median {sorted(log['tokens_per_s'])[len(log['tokens_per_s']) // 2]:.0f} "
          f"tokens/s, step peak {steady_peak(log):.0f} MiB (median after warm-up) -> {path}")  # fmt: skip


if __name__ == "__main__":
    main()
