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


def trace_checkpointed_layers(model: nn.Module) -> nn.Module:
    """Let Dynamo trace the checkpointed layers of an HF model trained with gradient checkpointing (or the user's
    own ``torch.utils.checkpoint`` around HF layers), so that mst chunks the MLPs and MoE blocks inside them
    (NOTE [checkpointed layer tracing]). Call it once, before the first compiled step::

        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        mst_compile.recipes.trace_checkpointed_layers(model)
        step = torch.compile(model, backend="mst")

    NOTE [checkpointed layer tracing]: two forward side effects inside HF layers make Dynamo give up on every
    checkpointed layer, with any backend (the layer runs eagerly, its MLP whole):
    - HF records outputs (the router logits of the load-balancing loss) with forward hooks its models install
      lazily, at their first call, under a ``threading.Lock``; Dynamo cannot enter a lock. Installed ahead of
      time (for models with ``output_router_logits``), the recorder's ``append`` is a side effect in the
      checkpoint body;
    - since transformers 5.25, attention modules carry ``kernels``' ``use_kernelized_func`` wrapper, which sets
      a module-global routing table before the forward and resets it after: a mutation of a global object.
    Dynamo refuses side effects in a checkpoint body unless told not to replay them in the recompute
    (``torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint``). Neither needs replaying: the
    recompute needs the tensors, not a second copy of the recorded logits, and the routing table is back to its
    old value when the forward returns. That setting is global to Dynamo: other forward side effects under a
    checkpoint are not replayed in the backward either, as the flag's own documentation says. The backend warns
    when Dynamo ran checkpointed code eagerly for this reason (``warn_on_eager_checkpoints``).
    Returns ``model``."""
    installed = 0
    try:
        from transformers import PreTrainedModel
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # not an HF model, or a transformers without output recorders
        pass
    else:
        for module in model.modules():  # only where the loss reads a recorded value: installed, the recorders
            # also run when a layer is called outside the model's forward, where they break the graph
            if isinstance(module, PreTrainedModel) and getattr(module.config, "output_router_logits", False):
                maybe_install_capturing_hooks(module)
                installed += 1
    _compat.dynamo_config().skip_fwd_side_effects_in_bwd_under_checkpoint = True
    log.info("installed the output recorders of %d modules of %s; forward side effects under checkpoint are not "
             "replayed in the backward", installed, type(model).__name__)  # fmt: skip
    return model


#: the earlier name, from when the router-logit recorders were the one side effect (NOTE [checkpointed layer
#: tracing])
trace_checkpointed_moe = trace_checkpointed_layers

_warned_eager_checkpoints = False


def warn_on_eager_checkpoints() -> None:
    """Warn once when Dynamo ran checkpointed code eagerly because of a forward side effect (NOTE [checkpointed
    layer tracing]): those layers never reach the backend, so nothing in them is chunked."""
    global _warned_eager_checkpoints
    if _warned_eager_checkpoints or _compat.dynamo_config().skip_fwd_side_effects_in_bwd_under_checkpoint:
        return
    if seen := _compat.checkpoint_side_effect_breaks():
        _warned_eager_checkpoints = True
        log.warning("mst: Dynamo ran %d checkpointed call(s) eagerly (a forward side effect under activation "
                    "checkpointing, e.g. transformers' kernel routing or output recorders), so their MLPs are not "
                    "chunked; call mst_compile.recipes.trace_checkpointed_layers(model) before the first compiled "
                    "step", seen)  # fmt: skip
