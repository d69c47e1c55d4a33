"""Tiny random-init models of the frameworks people train with, compiled the way each framework compiles them,
under ``backend="mst"`` or plain Inductor: one training step's loss and peak memory, as one JSON line.

    python examples/frameworks.py litgpt --backend mst --tokens 4096
    python examples/frameworks.py litgpt --backend inductor --tokens 4096
    python examples/frameworks.py vit | torchtitan | torchtune | styles ...
    python examples/frameworks.py torchtune --layout whole-model ...   (LAYOUTS: what else each can compile)

How each framework compiles (no model code changes anywhere):

- ``litgpt``: a Llama-style ``litgpt.GPT`` and litgpt's ``chunked_cross_entropy``, the step (model + loss)
  compiled as one function. ``--litgpt-loss-chunk 128`` is litgpt's default loss, which splits the logits and
  calls ``cross_entropy(reduction="none")`` per split: mst then chunks the MLPs only (the head is not a
  projection + mean/sum cross-entropy any more); 0 (this script's default) is one plain cross-entropy.
- ``vit``: timm's ``VisionTransformer`` when timm imports, otherwise ``TimmStyleViT`` below (the same module
  structure); the whole model compiled, cross-entropy over classes outside.
- ``torchtitan``: its Llama 3 model (``Llama3Model`` from a tiny config, SDPA inner attention), each
  transformer block compiled by torchtitan's own ``apply_compile`` and the loss by its ``CrossEntropyLoss``
  with ``compile.backend`` set to the backend; the final norm and ``lm_head`` run eagerly, as in torchtitan.
- ``torchtune``: ``llama3`` from its component builders, per-layer ``training.compile_model`` and
  ``compile_loss(CEWithChunkedOutputLoss)`` (``TORCH_COMPILE_BACKEND`` selects the backend, as in its recipes);
  the output projection runs eagerly, in torchtune's own chunks.
- ``styles``: ``TinyLM``, two pre-norm layers whose feed-forward is spelled one of the ``STYLES`` ways
  (einsum, ``x @ W``, ``nn.Sequential``, the GLU family), the whole model + loss compiled.

The other layouts: ``litgpt --layout model`` compiles the model alone and computes the loss outside (litgpt's
scripts); ``torchtitan --layout head-with-loss`` stops the model before ``lm_head`` (``_skip_lm_head``) and
compiles ``lm_head`` + its loss as one function; ``torchtune --layout whole-model`` builds the model with no
output chunks and compiles it with one cross-entropy.

CPU peaks are the RSS high-water mark of the last step above its start; the script runs itself again with
``MALLOC_MMAP_THRESHOLD_=65536`` when it is not set (see ``examples/train_long_context.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import unittest.mock

if __name__ == "__main__" and "MALLOC_MMAP_THRESHOLD_" not in os.environ and not {"-h", "--help"} & set(sys.argv):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

FRAMEWORKS = ("litgpt", "vit", "torchtitan", "torchtune", "styles")
#: how a framework's step can be compiled: the first is what the framework does by default
LAYOUTS = {"litgpt": ("step", "model"), "torchtitan": ("per-block", "head-with-loss"),
           "torchtune": ("chunked-output", "whole-model")}  # fmt: skip


# ---- litgpt ------------------------------------------------------------------------------------------------


def litgpt_model(name: str = "Llama-3.2-1B", n_embd: int = 64, intermediate: int = 160, vocab: int = 256,
                 block: int = 256, seed: int = 0, **overrides):  # fmt: skip
    """``litgpt.GPT`` of the named config's style (MLP class, norms, rope, residual layout) at a tiny size."""
    from litgpt import GPT, Config

    kw = dict(n_layer=2, n_embd=n_embd, n_head=4, n_query_groups=2, head_size=n_embd // 4, vocab_size=vocab,
              padded_vocab_size=vocab, block_size=block, intermediate_size=intermediate)  # fmt: skip
    kw.update(overrides)
    cfg = Config.from_name(name, **kw)
    torch.manual_seed(seed)
    return GPT(cfg)


def litgpt_loss(model, ids, chunk_size: int = 0):
    """litgpt's next-token loss as its pretraining script computes it."""
    from litgpt.utils import chunked_cross_entropy

    logits = model(ids)
    return chunked_cross_entropy(logits[..., :-1, :], ids[..., 1:], chunk_size=chunk_size)


# ---- ViT ---------------------------------------------------------------------------------------------------


class TimmStyleViT(nn.Module):
    """timm's ``VisionTransformer`` layout (patch conv, class token, pre-norm blocks with ``Mlp``: fc1, GELU,
    dropout, fc2; head on the class token), for machines where timm does not import."""

    def __init__(self, img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0, num_classes=10):
        super().__init__()
        self.patch = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        n = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, embed_dim) * 0.02)
        self.blocks = nn.ModuleList([_ViTBlock(embed_dim, num_heads, int(embed_dim * mlp_ratio)) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


class _ViTBlock(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim), nn.Dropout(0.0))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(a)
        return x + self.mlp(self.norm2(x))


def vit_model(seed: int = 0, **kw):
    """timm's ``VisionTransformer`` when timm imports, else ``TimmStyleViT``; ``(model, "timm" | "timm-style")``."""
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    args.update(kw)
    torch.manual_seed(seed)
    try:
        from timm.models.vision_transformer import VisionTransformer
    except Exception:  # noqa: BLE001 - timm needs a torchvision that loads beside this torch
        return TimmStyleViT(**args), "timm-style"
    return VisionTransformer(**args), "timm"


# ---- feed-forward styles -----------------------------------------------------------------------------------


class EinsumMLP(nn.Module):
    """Weights kept ``[in, out]``, projections by einsum (flax / mesh-tensorflow style)."""

    def __init__(self, h=16, i=48):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(h, i) * 0.1), nn.Parameter(torch.randn(i, h) * 0.1)

    def forward(self, x):
        return torch.einsum("btf,fd->btd", F.gelu(torch.einsum("btd,df->btf", x, self.w1)), self.w2)


class EinsumSwiGLU(nn.Module):
    """Weights ``[out, in]`` as ``nn.Linear`` keeps them, einsum over an ellipsis, the weight first once."""

    def __init__(self, h=16, i=48):
        super().__init__()
        self.w1, self.w3 = nn.Parameter(torch.randn(i, h) * 0.1), nn.Parameter(torch.randn(i, h) * 0.1)
        self.w2 = nn.Parameter(torch.randn(h, i) * 0.1)

    def forward(self, x):
        g = torch.einsum("...d,fd->...f", x, self.w1)
        u = torch.einsum("fd,...d->...f", self.w3, x)
        return torch.einsum("...f,df->...d", F.silu(g) * u, self.w2)


class MatmulMLP(nn.Module):
    """``x @ W`` projections with a squared-ReLU (Primer / nanoGPT speedrun style)."""

    def __init__(self, h=16, i=48):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(h, i) * 0.1), nn.Parameter(torch.randn(i, h) * 0.1)

    def forward(self, x):
        return torch.matmul(F.relu(x @ self.w1).square(), self.w2)


class SequentialGLU(nn.Module):
    def __init__(self, h=16, i=48):
        super().__init__()
        self.ff = nn.Sequential(nn.Linear(h, 2 * i), nn.GLU(), nn.Dropout(0.0), nn.Linear(i, h))

    def forward(self, x):
        return self.ff(x)


class FunctionalGLU(nn.Module):
    def __init__(self, h=16, i=48):
        super().__init__()
        self.proj, self.out = nn.Linear(h, 2 * i), nn.Linear(i, h)

    def forward(self, x):
        return self.out(F.glu(self.proj(x), dim=-1))


class GLUVariant(nn.Module):
    """The GLU family of Shazeer 2020 on a fused projection split in two: ReGLU, bilinear, SwiGLU, GEGLU."""

    ACTS = {"reglu": F.relu, "bilinear": lambda t: t, "swiglu": F.silu, "geglu": F.gelu}

    def __init__(self, act, h=16, i=48):
        super().__init__()
        self.wi, self.wo, self.act = nn.Linear(h, 2 * i, bias=False), nn.Linear(i, h, bias=False), self.ACTS[act]

    def forward(self, x):
        a, b = self.wi(x).split(self.wo.in_features, dim=-1)
        return self.wo(self.act(a) * b)


#: feed-forward spellings, each ``(h, i) -> module``
STYLES = {
    "einsum": EinsumMLP, "einsum-swiglu": EinsumSwiGLU, "matmul-relu2": MatmulMLP, "sequential-glu": SequentialGLU,
    "f.glu": FunctionalGLU,
    "sequential-gelu": lambda h, i: nn.Sequential(nn.Linear(h, i), nn.GELU(), nn.Dropout(0.0), nn.Linear(i, h)),
    "sequential-mish": lambda h, i: nn.Sequential(nn.Linear(h, i), nn.Mish(), nn.Linear(i, h)),
    **{k: (lambda h, i, k=k: GLUVariant(k, h, i)) for k in GLUVariant.ACTS},
}  # fmt: skip


class TinyLM(nn.Module):
    """Embedding, two pre-norm residual feed-forward layers of one style, untied head, next-token cross-entropy."""

    def __init__(self, style: str, h=16, i=64, v=64):
        super().__init__()
        self.emb, self.head = nn.Embedding(v, h), nn.Linear(h, v, bias=False)
        self.norms = nn.ModuleList([nn.LayerNorm(h) for _ in range(2)])
        self.ffs = nn.ModuleList([STYLES[style](h, i) for _ in range(2)])

    def forward(self, ids):
        x = self.emb(ids)
        for norm, ff in zip(self.norms, self.ffs):
            x = x + ff(norm(x))
        return F.cross_entropy(self.head(x[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())


# ---- torchtitan --------------------------------------------------------------------------------------------


def titan_model(dim: int = 64, hidden: int = 192, vocab: int = 256, n_layers: int = 2, n_heads: int = 4,
                max_seq_len: int = 256, seed: int = 0, attention: str = "sdpa"):  # fmt: skip
    """torchtitan's ``Llama3Model`` built like its ``debugmodel`` flavor, smaller, with the SDPA inner attention
    (``attention="flex"`` or ``"varlen"``: torchtitan's own language-model backends, see tests/frameworks)."""
    import torchtitan.models.llama3 as titan_llama3
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention

    rope = ComplexRoPE.Config(dim=dim // n_heads, max_seq_len=max_seq_len, theta=500000, scaling="llama")
    own = titan_llama3.get_attention_config
    with unittest.mock.patch.object(titan_llama3, "get_attention_config",
                                    lambda b: ScaledDotProductAttention.Config() if b == "sdpa" else own(b)):
        layers = titan_llama3._build_llama3_layers(n_layers=n_layers, dim=dim, n_heads=n_heads, n_kv_heads=n_heads // 2,
                                                   hidden_dim=hidden, rope=rope, attn_backend=attention)  # fmt: skip
    cfg = titan_llama3.Llama3Model.Config(
        dim=dim, vocab_size=vocab, layers=layers,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim, param_init=titan_llama3._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=dim, param_init=titan_llama3._NORM_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab, param_init=titan_llama3._output_linear_init(dim)),
    )  # fmt: skip
    torch.manual_seed(seed)
    model = cfg.build()
    model.init_states()
    return model


def titan_compile(model, backend: str):
    """What torchtitan's trainer does with ``--compile.enable --compile.backend BACKEND``: ``apply_compile`` on
    the blocks, and the loss built with the compile config. Returns the loss (``pred, labels -> loss``)."""
    from torchtitan.components.loss import CrossEntropyLoss
    from torchtitan.config import CompileConfig
    from torchtitan.distributed.compile import apply_compile
    from torchtitan.distributed.parallel_dims import ParallelDims

    cc = CompileConfig(enable=True, backend=backend) if backend != "eager" else None
    if cc is not None:
        apply_compile(model, compile_config=cc, parallel_dims=ParallelDims(1, 1, 1, 1, 1, 1, 1))
    return CrossEntropyLoss(CrossEntropyLoss.Config(), compile_config=cc)


def titan_step(model, loss_fn, ids):
    """torchtitan's forward-backward: the sum-reduced loss divided by the number of label tokens."""
    inp, labels = ids[:, :-1], ids[:, 1:]
    loss, _ = loss_fn(model(inp), labels, torch.tensor(labels.numel()))
    return loss


# ---- torchtune ---------------------------------------------------------------------------------------------


def tune_model(dim: int = 64, hidden: int = 160, vocab: int = 256, max_seq_len: int = 256, chunks: int = 8, seed: int = 0):
    from torchtune.models.llama3._component_builders import llama3

    torch.manual_seed(seed)
    model = llama3(vocab_size=vocab, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=dim,
                   max_seq_len=max_seq_len, intermediate_dim=hidden)  # fmt: skip
    model.set_num_output_chunks(chunks)  # what its recipes do with CEWithChunkedOutputLoss
    return model


def tune_compile(model, backend: str, chunks: int = 8):
    """torchtune's recipe with ``compile: True``: ``compile_model`` per layer, ``compile_loss`` on the chunked
    loss's cross-entropy; the backend comes from ``TORCH_COMPILE_BACKEND``. Returns the loss module."""
    from torchtune import training
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    loss = CEWithChunkedOutputLoss(num_output_chunks=chunks)
    if backend == "eager":
        return loss
    with unittest.mock.patch.dict(os.environ, {"TORCH_COMPILE_BACKEND": backend}):
        training.compile_model(model, verbose=False)
        return training.compile_loss(loss, verbose=False)


# ---- one arm -----------------------------------------------------------------------------------------------


def arm(framework: str, backend: str, tokens: int, litgpt_loss_chunk: int = 0, options: dict | None = None,
        litgpt_config: str = "Llama-3.2-1B", layout: str | None = None, style: str = "einsum-swiglu",
        capture_where: bool = True):  # fmt: skip
    """``(step, what)``: ``step()`` runs forward + backward of one batch of ``tokens`` tokens and returns the loss.
    ``layout`` is one of ``LAYOUTS[framework]`` (its first by default)."""
    g = torch.Generator().manual_seed(0)
    opts = {"options": options} if (backend == "mst" and options) else {}
    layouts = LAYOUTS.get(framework, (None,))
    layout = layout or layouts[0]
    if layout not in layouts:
        raise ValueError(f"{framework} has the layouts {layouts}, not {layout!r}")
    compile_ = (lambda f: torch.compile(f, backend=backend, **opts)) if backend != "eager" else (lambda f: f)
    if framework == "litgpt":
        moe = {"n_expert": 8, "n_expert_per_token": 2} if "Mixtral" in litgpt_config else {}
        if moe and capture_where:  # LLaMAMoE dispatches with torch.where: one graph per step only when Dynamo
            torch._dynamo.config.capture_dynamic_output_shape_ops = True  # captures it (both arms)
        model = litgpt_model(litgpt_config, n_embd=128, intermediate=1024, vocab=8192, block=tokens + 1, **moe)
        ids = torch.randint(0, 8192, (1, tokens + 1), generator=g)
        what = "litgpt %s style, loss chunk_size=%d, %s compiled" % (litgpt_config, litgpt_loss_chunk, layout)
        if moe and not capture_where:
            what += ", torch.where not captured"
        if layout == "model":  # its pretrain/finetune scripts: the model compiled, the loss outside
            cm = compile_(model)
            return (lambda: litgpt_loss(cm, ids, litgpt_loss_chunk)), what
        return compile_(lambda: litgpt_loss(model, ids, litgpt_loss_chunk)), what
    if framework == "styles":
        torch.manual_seed(0)
        model = TinyLM(style, h=128, i=1024, v=8192)
        ids = torch.randint(0, 8192, (1, tokens + 1), generator=g)
        cm = compile_(model)
        return (lambda: cm(ids)), f"{style} feed-forwards"
    if framework == "vit":
        # 224-pixel images in 16-pixel patches: 197 tokens an image (the MLP runs over batch x patches)
        model, kind = vit_model(img_size=224, patch_size=16, embed_dim=128, depth=2, num_heads=2, mlp_ratio=8.0)
        imgs = torch.randn(max(1, tokens // 197), 3, 224, 224, generator=g)
        labels = torch.randint(0, 10, (imgs.shape[0],), generator=g)
        cm = compile_(model)
        return (lambda: F.cross_entropy(cm(imgs), labels)), kind
    if framework == "torchtitan":
        model = titan_model(dim=128, hidden=2048, vocab=512, max_seq_len=tokens + 1)
        ids = torch.randint(0, 512, (1, tokens + 1), generator=g)
        loss_fn = titan_compile(model, backend)
        if layout == "head-with-loss":  # the model stops before lm_head; lm_head + the loss compiled as one
            from torchtitan.components.loss import cross_entropy_loss

            model._skip_lm_head = True
            n = torch.tensor(ids[:, 1:].numel())
            head_loss = compile_(lambda h, y: cross_entropy_loss(model.lm_head(h), y) / n)
            step = lambda: head_loss(model(ids[:, :-1]), ids[:, 1:])  # noqa: E731
        else:
            step = lambda: titan_step(model, loss_fn, ids)  # noqa: E731
        return _with_options(step, backend, options), f"torchtitan llama3, {layout}"
    if framework == "torchtune":
        chunks = 8 if layout == "chunked-output" else 0
        model = tune_model(dim=128, hidden=2048, vocab=512, max_seq_len=tokens, chunks=chunks)
        ids = torch.randint(0, 512, (1, tokens), generator=g)
        if chunks:
            loss_fn = tune_compile(model, backend, chunks)
            step = lambda: loss_fn(model(ids), ids)  # noqa: E731
        else:  # the whole model and one plain cross-entropy compiled as one function
            step = compile_(lambda: F.cross_entropy(model(ids).float().flatten(0, 1), ids.flatten()))
        return _with_options(step, backend, options), f"torchtune llama3, {layout}"
    raise ValueError(f"unknown framework {framework!r}; one of {FRAMEWORKS}")


def _mst_options(backend, options):
    import contextlib

    import mst_compile

    return mst_compile.config_context(**options) if backend == "mst" and options else contextlib.nullcontext()


def _with_options(step, backend, options):
    """Frameworks that pass only a backend name: mst's options as the process default while the step runs
    (the graphs compile on the first call)."""

    def run():
        with _mst_options(backend, options):
            return step()

    return run


def measure(framework: str, backend: str, tokens: int, steps: int = 3, **kw) -> dict:
    from mst_compile.bench.measure import PeakMeter

    step, what = arm(framework, backend, tokens, **kw)
    for _ in range(steps - 1):  # warm-up: compiles, and the steps' allocations settle
        step().backward()
    with PeakMeter("cpu") as m:
        loss = step()
        loss.backward()
    out = {"framework": framework, "what": what, "backend": backend, "tokens": tokens, "loss": loss.item(),
           "peak_mib": round(m.peak_mib, 1)}  # fmt: skip
    if backend == "mst":
        import mst_compile

        out["counters"] = dict(mst_compile.counters)
        out["reports"] = [str(r) for r in mst_compile.reports()]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("framework", choices=FRAMEWORKS)
    p.add_argument("--backend", default="mst", help="mst | inductor | eager")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3, help="steps run; the last one is measured")
    p.add_argument("--litgpt-loss-chunk", type=int, default=0)
    p.add_argument("--litgpt-config", default="Llama-3.2-1B", help="a litgpt config name (its style, tiny size)")
    p.add_argument("--no-capture-where", action="store_true",
                   help="litgpt MoE: leave capture_dynamic_output_shape_ops off (Dynamo breaks at torch.where)")
    p.add_argument("--layout", default=None, help="what is compiled: " + "; ".join(
        f"{k}: {' | '.join(v)}" for k, v in LAYOUTS.items()))  # fmt: skip
    p.add_argument("--style", default="einsum-swiglu", choices=sorted(STYLES), help="styles: the feed-forward")
    p.add_argument("--options", default=None, help="mst options as JSON")
    a = p.parse_args(argv)
    kw = {"litgpt_loss_chunk": a.litgpt_loss_chunk, "litgpt_config": a.litgpt_config, "layout": a.layout,
          "style": a.style, "capture_where": not a.no_capture_where,
          "options": json.loads(a.options) if a.options else None}  # fmt: skip
    sys.stdout.write(json.dumps(measure(a.framework, a.backend, a.tokens, a.steps, **kw)) + "\n")


if __name__ == "__main__":
    main()
