"""Recipes for training setups that compile a model piece by piece (FSDP2 per layer, torchtitan style).

NOTE [per-layer compile and the mask]: compiled per decoder layer, a layer's graph receives the attention mask
as an input, a runtime tensor no proof can see into; so the mask must not exist. HF builds it when the base
model's own code runs under Dynamo: there the position ids are symbolic, so HF cannot check for packed
sequences or padding and materializes a ``tokens x tokens`` mask (16 GiB bool at 128K tokens, and masked
attention instead of causal kernels in every layer). Run eagerly, the same code reads the values and, with no
padding and no packing, passes no mask: SDPA runs ``is_causal=True``. So :func:`compile_per_layer` compiles
each decoder layer and the model around the base model (head + loss: chunked by mst), and leaves the base
model's own code (embedding, masks, rotary tables, final norm: no large intermediates) to eager.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from . import _compat

log = logging.getLogger("mst_compile.recipes")


def _decoder_layers(base: nn.Module) -> nn.ModuleList:
    for name in ("layers", "h", "blocks", "layer"):
        found = getattr(base, name, None)
        if isinstance(found, nn.ModuleList):
            return found
    raise ValueError(f"{type(base).__name__} has no ModuleList of decoder layers (layers, h, blocks): pass layers=")


def compile_per_layer(model: nn.Module, *, backend="mst", options: dict | None = None, layers=None,
                      **compile_kwargs) -> nn.Module:  # fmt: skip
    """Compile ``model`` in place one decoder layer at a time plus the head and loss, as FSDP2 training does,
    with no ``tokens x tokens`` mask in any layer graph (NOTE [per-layer compile and the mask]).

    Call it after ``fully_shard`` (per layer, then the root)::

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        mst_compile.recipes.compile_per_layer(model)        # then train ``model`` as usual

    ``layers``: the decoder layers (default: the ``ModuleList`` ``layers``/``h``/``blocks`` of
    ``model.base_model``). ``backend``, ``options`` and other keywords go to every ``Module.compile`` call.
    Returns ``model``."""
    base = getattr(model, "base_model", model)
    layers = _decoder_layers(base) if layers is None else layers
    kw = dict(compile_kwargs, backend=backend)
    if options is not None:
        kw["options"] = options
    for layer in layers:
        layer.compile(**kw)
    if base is not model:
        # an instance attribute: the class and every other instance keep their forward
        base.forward = torch.compiler.disable(base.forward)
        model.compile(**kw)
    log.info("compiled %d layers of %s one by one%s", len(layers), type(model).__name__,
             ", and the head and loss around its base model" if base is not model else "")  # fmt: skip
    return model


def trace_checkpointed_moe(model: nn.Module) -> nn.Module:
    """Let Dynamo trace an HF mixture-of-experts model trained with gradient checkpointing as one graph, so that
    mst chunks its MoE blocks inside the checkpointed layers (NOTE [checkpointed MoE tracing]). Call it once,
    before the first compiled step::

        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        mst_compile.recipes.trace_checkpointed_moe(model)
        step = torch.compile(model, backend="mst")

    NOTE [checkpointed MoE tracing]: HF records the router logits (for the load-balancing loss) with forward hooks
    that its models install lazily, at their first call, under a ``threading.Lock``; Dynamo cannot enter a lock
    and breaks the graph at every layer, so no MoE block is ever in a graph (with any backend). With the hooks
    installed ahead of time, the recorder's ``append`` inside a checkpointed layer is a side effect Dynamo refuses
    in a checkpoint body unless told not to replay it in the recompute
    (``torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint``): the recompute needs the tensors,
    not a second copy of the recorded logits. That setting is global to Dynamo: other forward side effects under
    a checkpoint are not replayed in the backward either, as the flag's own documentation says.
    Returns ``model``."""
    from transformers import PreTrainedModel
    from transformers.utils.output_capturing import maybe_install_capturing_hooks

    installed = 0
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            maybe_install_capturing_hooks(module)
            installed += 1
    _compat.dynamo_config().skip_fwd_side_effects_in_bwd_under_checkpoint = True
    log.info("installed the output recorders of %d modules of %s; forward side effects under checkpoint are not "
             "replayed in the backward", installed, type(model).__name__)  # fmt: skip
    return model
