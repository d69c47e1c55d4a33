"""Faults and bad input: injected failures in each pass, NaN/Inf propagation, graph breaks and recompiles."""

import pytest
import torch

import mst_compile
from mst_compile import _compat
from mst_compile.bench import zoo
from tests.conftest import grads
from tests.modules import Block, GatedMLP, LMHead

AOT = {"num_chunks": 3, "compiler": "aot_eager"}


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.head = Block(GatedMLP(), layers=1), LMHead()

    def forward(self, x, y):
        return self.head(self.block(x), y)


@pytest.mark.parametrize("name", [p[0] for p in mst_compile.passes.PASSES])
def test_fault_in_each_pass_falls_back_with_one_warning(monkeypatch, name):
    def broken(gm, ctx):
        raise RuntimeError(f"injected into {name}")

    monkeypatch.setattr(
        mst_compile.passes, "PASSES", tuple((n, broken if n == name else f, s) for n, f, s in mst_compile.passes.PASSES)
    )
    net = Net()
    x, y = torch.randn(2, 6, 16, requires_grad=True), torch.randint(0, 200, (2, 6))
    ref = net(x, y)
    with pytest.warns(UserWarning, match=f"injected into {name}") as rec:
        out = torch.compile(net, backend="mst", options=AOT)(x, y)
    assert len([w for w in rec if "mst" in str(w.message)]) == 1
    torch.testing.assert_close(out, ref)
    assert mst_compile.last_report().fallback


def test_nan_and_inf_propagate_as_in_eager():
    net = Net()
    x, y = torch.randn(2, 6, 16), torch.randint(0, 200, (2, 6))
    x[0, 2, 3] = float("inf")
    x[1, 4, 0] = float("nan")
    x.requires_grad_(True)
    ref = net(x, y)
    ref.backward()
    ref_g = grads(net)
    net.zero_grad(set_to_none=True)
    out = torch.compile(net, backend="mst", options=AOT)(x, y)
    out.backward()
    torch.testing.assert_close(out, ref, equal_nan=True)
    for n, g in grads(net).items():
        assert torch.equal(torch.isnan(g), torch.isnan(ref_g[n])), n


def _dynamo_stats(backend, options=None):
    torch._dynamo.reset()
    _compat.dynamo_counters.clear()
    model = zoo.build("llama")
    cm = torch.compile(model, backend=backend, **({"options": options} if options else {}))
    for seq in (9, 9, 12):  # a repeat and a new length
        ids = torch.randint(0, zoo.V, (2, seq))
        cm(input_ids=ids, labels=ids).loss.backward()
    c = _compat.dynamo_counters
    return sum(c["graph_break"].values()), c["stats"]["unique_graphs"]


@pytest.mark.slow
def test_no_extra_graph_breaks_or_recompiles_vs_torch_compile():
    breaks_ref, graphs_ref = _dynamo_stats("aot_eager")
    breaks, graphs = _dynamo_stats("mst", AOT)
    assert breaks == breaks_ref
    assert graphs == graphs_ref
