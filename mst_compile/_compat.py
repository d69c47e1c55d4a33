"""Every private (underscore) torch import of the package lives here.

Keeping them in one file means a torch upgrade that moves one of these names breaks exactly one place.
"""

from __future__ import annotations

from torch._dynamo.utils import counters as dynamo_counters  # noqa: F401
from torch._inductor.compile_fx import compile_fx  # noqa: F401
from torch._inductor.custom_graph_pass import CustomGraphPass  # noqa: F401
from torch._ops import OpOverload  # noqa: F401
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode  # noqa: F401
from torch.fx.experimental.symbolic_shapes import ShapeEnv  # noqa: F401
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: F401

import torch
import torch.nn.functional as F

# The function Dynamo records for ``nn.Linear`` (and the passes write back), and the functional spelling a model
# may call instead; the same pair for scaled dot-product attention.
LINEAR = torch._C._nn.linear
LINEAR_FUNCTIONS = (LINEAR, F.linear)
SDPA_FUNCTIONS = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)


class ChainedPass(CustomGraphPass):
    """Several custom passes in one Inductor slot, run in order, for a torch whose slots hold one pass (before
    ``get_custom_graph_passes``: torch 2.11); its ``uuid`` is its passes' (``None``, so no cache entry, when one
    of them has none)."""

    def __init__(self, passes):
        self.passes = tuple(passes)

    def __call__(self, graph):
        for p in self.passes:
            p(graph)

    def uuid(self):
        ids = [p.uuid() if isinstance(p, CustomGraphPass) else None for p in self.passes]
        return None if any(i is None for i in ids) else repr(ids)


try:
    from torch._inductor.custom_graph_pass import get_custom_graph_passes as _slot_passes

    SLOTS_HOLD_TUPLES = True
except ImportError:  # torch 2.11: one pass per slot
    SLOTS_HOLD_TUPLES = False

    def _slot_passes(p):
        return () if p is None else tuple(p) if isinstance(p, (list, tuple)) else (p,)


def custom_graph_passes(slot) -> tuple:
    """The passes an Inductor custom-pass slot holds, in order (a :class:`ChainedPass` opened)."""
    return tuple(q for p in _slot_passes(slot) for q in (p.passes if isinstance(p, ChainedPass) else (p,)))


def slot_value(passes: tuple):
    """What an Inductor custom-pass slot is set to for ``passes`` run in order: one pass as itself; several as a
    tuple where the slot takes one, else as one :class:`ChainedPass`."""
    if len(passes) == 1:
        return passes[0]
    return tuple(passes) if SLOTS_HOLD_TUPLES else ChainedPass(passes)


def lookup_backend(name: str):
    """A registered ``torch.compile`` backend by name (Dynamo's registry)."""
    return torch._dynamo.lookup_backend(name)


def register_backend_by_name(name: str, fn) -> bool:
    """Register ``fn`` as ``torch.compile(backend=name)`` unless that name is known already (an installed entry
    point); whether it registered."""
    if name in torch._dynamo.list_backends(exclude_tags=()):
        return False
    torch._dynamo.register_backend(fn, name=name)
    return True


def inductor_mode_options(mode: str) -> dict:
    """The Inductor config keys a ``torch.compile`` mode (``"max-autotune"``, ...) stands for."""
    return dict(torch._inductor.list_mode_options(mode))


def inductor_metrics():
    """Inductor's metrics module (generated kernel counts, reset between compiles)."""
    from torch._inductor import metrics

    return metrics


def inductor_config():
    """The Inductor config module (``torch._inductor.config``)."""
    import torch._inductor.config as cfg

    return cfg


def dynamo_config():
    """The Dynamo config module (``torch._dynamo.config``)."""
    import torch._dynamo.config as cfg

    return cfg


def functorch_config():
    """The functorch config module (``torch._functorch.config``)."""
    import torch._functorch.config as cfg

    return cfg


def checkpoint_side_effect_breaks() -> int:
    """How many times Dynamo gave up on a checkpoint body for a forward side effect (its graph-break counters;
    NOTE [checkpointed layer tracing])."""
    from torch._dynamo.utils import counters

    hint = "skip_fwd_side_effects_in_bwd_under_checkpoint"
    return sum(n for reason, n in counters["graph_break"].items() if hint in reason)


def saved_tensor_hooks_deferred():
    """The caller's ``saved_tensors_hooks`` held back while mst traces (``torch._dynamo.utils``' context, which
    AOTAutograd enters for its own tracing): a pack hook then never sees a FakeTensor from a compile-time check,
    and still runs on the compiled step's real tensors."""
    from torch._dynamo.utils import _disable_saved_tensors_hooks_during_tracing

    return _disable_saved_tensors_hooks_during_tracing()


class autograd_inside_op:
    """Re-enable autograd recording inside a custom op's implementation.

    A ``torch.library.custom_op`` runs its kernel with the autograd dispatch keys excluded, so
    ``torch.autograd.grad`` there sees no graph. The chunk loops recompute each chunk under autograd, so they
    lift that exclusion (and grad mode) for the duration of the block.
    """

    def __enter__(self):
        import torch

        dk = torch._C.DispatchKey
        excl = torch._C._dispatch_tls_local_exclude_set() - torch._C.DispatchKeySet(dk.AutogradFunctionality)
        incl = torch._C._dispatch_tls_local_include_set() - torch._C.DispatchKeySet(dk.ADInplaceOrView)
        self._guard = torch._C._ForceDispatchKeyGuard(incl, excl)
        self._grad = torch.enable_grad()
        self._guard.__enter__()
        self._grad.__enter__()
        return self

    def __exit__(self, *exc):
        self._grad.__exit__(*exc)
        self._guard.__exit__(*exc)
        return False


def compile_fx_rows_dynamic(gm, args, rows_args=(0,)):
    """Inductor's ``compile_fx`` on ``gm`` with fake inputs whose dimension 0 is a symbol for the inputs
    ``rows_args`` (the row-indexed ones: a chunk's rows and, for a loss, its labels; a static row count in one of
    them would specialize the others to it): one compiled function for every row count of 2 or more (sizes 0
    and 1 are specialized away by the ShapeEnv). ``gm`` itself is left as it was (a copy is compiled):
    ``compile_fx`` annotates and rewrites the graph it is given, and a registered body holds no fake values.
    CUDA graphs stay off whatever the process's Inductor config says: a body runs inside the caller's compiled
    code, possibly inside that code's own CUDA graph capture, and must not make a graph of its own."""
    import copy

    from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv())
    fakes = []
    for i, a in enumerate(args):
        dyn = [DimDynamic.DYNAMIC if (i in rows_args and d == 0) else DimDynamic.STATIC for d in range(a.dim())]
        fakes.append(mode.from_tensor(a, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dyn)))
    return compile_fx(copy.deepcopy(gm), fakes, config_patches={"triton.cudagraphs": False})


def custom_op_kernel(op):
    """The Python function behind a ``torch.library.custom_op`` (below its dispatch: no autograd, no fake)."""
    return op._init_fn


def compile_id() -> tuple[int, int] | None:
    """``(frame_id, frame_compile_id)`` of the Dynamo compile in progress (``None`` outside one): the second
    number counts recompiles of the same frame."""
    from torch._guards import CompileContext

    cid = CompileContext.current_compile_id()
    if cid is None or getattr(cid, "frame_id", None) is None:
        return None
    return int(cid.frame_id), int(cid.frame_compile_id or 0)


def restart_exceptions() -> tuple[type, ...]:
    """Exceptions Dynamo uses for control flow (restart the analysis): a backend must let them through."""
    from torch._dynamo import exc

    return tuple(getattr(exc, n) for n in ("TensorifyScalarRestartAnalysis", "RestartAnalysis") if hasattr(exc, n))


def size_hint(n) -> int:
    """An int for a possibly symbolic size, without installing a guard (for estimates only)."""
    if isinstance(n, int):
        return n
    node = getattr(n, "node", None)
    hint = getattr(node, "hint", None)
    return int(hint) if isinstance(hint, int) else 0


def sym_expr(x):
    """The sympy expression behind a ``SymInt`` / ``SymBool`` (its ShapeEnv symbol); plain values unchanged."""
    node = getattr(x, "node", None)
    return node.expr if node is not None and hasattr(node, "expr") else x


def fake_mode_of(values):
    """The FakeTensorMode of the fake tensors among ``values`` (None if there are none); an error if they mix modes."""
    modes = {id(v.fake_mode): v.fake_mode for v in values if isinstance(v, FakeTensor)}
    if len(modes) > 1:
        raise RuntimeError(f"mst: fake values of {len(modes)} FakeTensorModes in one node's inputs")
    return next(iter(modes.values()), None)


def fx_compile_mode() -> str:
    """Inductor's FX compile mode (``TORCHINDUCTOR_FX_COMPILE_MODE``): ``normal``, ``serialize`` or ``subprocess``."""
    from torch._inductor import compile_fx as cfx

    mode = getattr(cfx, "fx_compile_mode", None)
    return getattr(mode, "name", "normal").lower()


def aot_cache_refusal(gm) -> str | None:
    """Why AOTAutograd's cache would bypass ``gm`` because of one of its nodes (``check_node_safe``), or None."""
    from torch._functorch._aot_autograd.autograd_cache import BypassAOTAutogradCache, check_node_safe

    for n in gm.graph.nodes:
        try:
            check_node_safe(n)
        except BypassAOTAutogradCache as e:
            return f"{n.format_node()}: {e}"
    return None


def static_input_indices(gm) -> list[int] | None:
    """The inputs of a Dynamo graph that AOTAutograd takes as static (parameters and buffers: CUDA graphs do not
    copy them into their pool on each replay), as AOTAutograd reads them from the graph's Dynamo metadata;
    ``None`` when ``gm`` carries none (AOTAutograd then takes every input as one to copy)."""
    from torch._functorch._aot_autograd.frontend_utils import _try_get_metadata_from_dynamo

    sources, static = _try_get_metadata_from_dynamo(gm, {}.keys(), len(gm.graph.find_nodes(op="placeholder")), [])
    return None if sources is None else static
