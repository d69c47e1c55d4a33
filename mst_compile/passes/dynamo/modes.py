"""The autocast and grad mode each node of a Dynamo graph runs under, and the one mode of a region."""

from __future__ import annotations

import torch
from torch import fx

from .context import CantChunk, PassContext


def _ambient_autocast() -> tuple | None:
    for device in ("cuda", "cpu"):
        if torch.is_autocast_enabled(device):
            return (device, torch.get_autocast_dtype(device))
    return None


def autocast_states(graph: fx.Graph) -> dict:
    """``node -> (device_type, dtype) | None``: the autocast each node runs under.

    Dynamo records ``with torch.autocast(...)`` inside the compiled code as ``_enter_autocast`` /
    ``_exit_autocast`` calls; autocast already on around the compiled call is the ambient state (Dynamo guards
    on it, so it is the state at run time too)."""
    stack = [_ambient_autocast()]
    states = {}
    for n in graph.nodes:
        name = getattr(n.target, "__name__", "") if n.op == "call_function" else ""
        if name == "_enter_autocast":
            device, dtype, enabled = (list(n.args) + [None, None, True])[:3]
            if dtype is None and enabled:
                dtype = torch.get_autocast_dtype(device)
            stack.append((device, dtype) if enabled else None)
        elif name == "_exit_autocast" and len(stack) > 1:
            stack.pop()
        states[n] = stack[-1]
    return states


def grad_states(graph: fx.Graph, ambient: bool) -> dict:
    """``node -> bool``: whether grad mode is on where each node runs.

    NOTE [grad mode per node]: Dynamo records ``with torch.enable_grad()`` / ``torch.no_grad()`` inside the
    compiled code as ``torch._C._set_grad_enabled`` calls in the graph; ``ambient`` is the mode around the
    compiled call (Dynamo guards on it). A pass reads the mode of the region's own nodes, never the caller's:
    a forward that enables grad inside, called under ``no_grad``, still needs every gradient."""
    state, states = ambient, {}
    for n in graph.nodes:
        if n.op == "call_function" and getattr(n.target, "__name__", "") == "_set_grad_enabled" and n.args:
            state = bool(n.args[0])
        states[n] = state
    return states


def region_grad(nodes, ctx: PassContext, graph: fx.Graph) -> bool:
    """The one grad mode of a region's nodes (NOTE [grad mode per node]); a region straddling a change of it
    can't be chunked."""
    states = grad_states(graph, ctx.grad_enabled)
    found = {states.get(n, ctx.grad_enabled) for n in nodes}
    if len(found) > 1:
        raise CantChunk("the region crosses a change of grad mode")
    return found.pop() if found else ctx.grad_enabled


def region_autocast(nodes, states: dict) -> tuple | None:
    """The one autocast state of a region's nodes; a region straddling an autocast boundary can't be chunked."""
    found = {states.get(n) for n in nodes}
    if len(found) > 1:
        raise CantChunk(f"the region crosses an autocast boundary ({sorted(map(str, found))})")
    return found.pop() if found else None
