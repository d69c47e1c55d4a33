"""The report a user reads: plain words (no FX-internal labels or mode names), correct plurals, the README's terms."""

import re

import torch

import mst_compile
from mst_compile.report import Region, Report
from tests.modules import GatedMLP, LMHead

INTERNAL = re.compile(r"graph#|\d+nodes|=bridge|=plain|\(s\)|chunks=")


def test_region_lines_use_plain_words():
    head = Region("head", "loss", "rewritten", chunks="1", shapes="h=[1, 64, 64] vocab=4096 logits=bridge",
                  bytes_saved=3 * 2**20)  # fmt: skip
    mask = Region("mask", "attention_mask", "rewritten", shapes="mask=[1, 1, 64, 64] -> is_causal, 1 attention calls")
    mlp = Region("mlp", "linear_4", "rewritten", chunks="8", shapes="x=[1, 64, 64] widths=[256, 256, 64]")
    rule = Region("mlp", "linear_9", "rewritten", chunks="one per 512 tokens", shapes="x=[1, s0, 64]")
    text = "\n".join(r.line() for r in (head, mask, mlp, rule))
    assert not INTERNAL.search(text), text
    assert "1 chunk," in head.line() and "logits returned (differentiable)" in head.line()
    assert "1 attention call" in mask.line() and "calls" not in mask.line()
    assert "8 chunks" in mlp.line() and "chunks: one per 512 tokens" in rule.line()
    assert "est. 3.0 MiB saved" in head.line()  # the README's words: "est. MiB saved"


def test_report_header_counts_in_words():
    one = Report(graph="12 nodes", regions=[Region("mlp", "linear", "rewritten", chunks="4")])
    assert str(one).splitlines()[0] == "mst: graph (12 nodes): 1 region rewritten, 0 skipped"
    two = Report(graph="12 nodes", index=3, regions=[Region("mlp", "a", "rewritten"), Region("mlp", "b", "rewritten"),
                                                     Region("head", "c", "skipped", reason="why")])  # fmt: skip
    assert str(two).splitlines()[0] == "mst: graph 3 (12 nodes): 2 regions rewritten, 1 skipped"


def test_backend_report_names_the_graph_by_number_and_size():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp, self.head = GatedMLP(), LMHead()

        def forward(self, x, y):
            return self.head(self.mlp(x), y)

    x, y = torch.randn(2, 8, 16), torch.randint(0, 200, (2, 8))
    torch.compile(Net(), backend="mst", options={"compiler": "aot_eager", "num_chunks": 2})(x, y)
    text = str(mst_compile.last_report())
    assert re.match(r"mst: graph 1 \(\d+ nodes\): 2 regions rewritten, 0 skipped", text), text
    assert not INTERNAL.search(text), text


def test_explain_words():
    from mst_compile.__main__ import main

    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["explain", "--model", "llama-tiny", "--tokens", "64", "--options", '{"num_chunks": 4}'])
    text = buf.getvalue()
    assert text.startswith("mst explain: 1 graph, 4 regions rewritten"), text  # 2 MLPs, the head, the causal mask
    assert "graph 1 (" in text and not INTERNAL.search(text), text
    assert "logits returned (differentiable)" in text
