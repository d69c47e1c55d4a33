import os

import torch

import mst_compile
from tests.modules import Block, GatedMLP, LMHead, TokenMixing


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.odd, self.head = Block(GatedMLP(), layers=2), TokenMixing(), LMHead()

    def forward(self, x, y):
        return self.head(self.odd(self.block(x)), y)


def test_explain_lists_rewritten_and_skipped_regions_without_training():
    net = Net()
    x, y = torch.randn(2, 8, 16, requires_grad=True), torch.randint(0, 200, (2, 8))
    res = mst_compile.explain(net, x, y, options={"num_chunks": 4})
    kinds = [(r.kind, r.status) for r in res.regions]
    assert kinds.count(("mlp", "rewritten")) == 2 and ("head", "rewritten") in kinds
    (skipped,) = [r for r in res.regions if r.status == "skipped"]
    assert "not row-wise" in skipped.reason
    assert all(r.chunks == "4" for r in res.regions if r.status == "rewritten")
    assert res.bytes_saved() > 0
    text = str(res)
    assert "rewritten" in text and "skipped" in text
    assert x.grad is None and all(p.grad is None for p in net.parameters())  # nothing was trained


def test_dump_dir_writes_graphs_before_and_after_each_pass(tmp_path):
    mst_compile.explain(Block(GatedMLP()), torch.randn(1, 4, 16), options={"dump_dir": str(tmp_path), "num_chunks": 2})
    names = sorted(os.listdir(tmp_path))
    assert any(n.endswith("0_input.py") for n in names) and any(n.endswith("mlp.py") for n in names)
    after = open(tmp_path / [n for n in names if n.endswith("mlp.py")][0]).read()
    assert "torch.ops.mst.rowwise" in after


def test_cli_explain(capsys):
    from mst_compile.__main__ import main

    main(["explain", "--model", "llama-tiny", "--tokens", "64", "--options", '{"num_chunks": 4}'])
    out = capsys.readouterr().out
    assert "4 regions rewritten" in out  # 2 MLPs, the head, the causal mask


def test_explain_leaves_other_compiled_models_compiled():
    from tests.modules import Block, PlainMLP

    model = Block(PlainMLP())
    x = torch.randn(2, 5, 16)
    cm = torch.compile(model, backend="mst", options={"compiler": "aot_eager"})
    cm(x)
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    mst_compile.explain(Block(PlainMLP()), x)
    cm(x)  # served from Dynamo's cache: no new frame compiled for the mst model
    assert torch._dynamo.utils.counters["frames"]["ok"] == frames + 1  # the explain trace only


def test_reports_per_model():
    from tests.modules import Block, GatedMLP, PlainMLP

    a, b = Block(PlainMLP()), GatedMLP()
    ca = torch.compile(a, backend="mst", options={"compiler": "aot_eager", "num_chunks": 2})
    cb = torch.compile(b, backend="mst", options={"compiler": "aot_eager", "num_chunks": 2})
    ca(torch.randn(2, 5, 16))
    cb(torch.randn(2, 5, 16))
    assert mst_compile.last_report() is mst_compile.last_report(b) is mst_compile.last_report(cb)
    ra = mst_compile.reports(a)
    assert len(ra) == 1 and ra == mst_compile.reports(ca) and ra[0] is not mst_compile.last_report(b)
    assert len(ra[0].rewritten("mlp")) == 2 and len(mst_compile.last_report(b).rewritten("mlp")) == 1
