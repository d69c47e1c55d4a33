"""The Inductor-pass mode (``MST_INDUCTOR_PASS=1``): rewrite a copy, swap it in, chain with other passes."""

import pytest
import torch

import mst_compile
from mst_compile import inductor_pass
from tests.conftest import calls, dynamo_graph
from tests.modules import Block, PlainMLP


def _graph():
    model = Block(PlainMLP())
    x = torch.randn(2, 5, 16, requires_grad=True)
    gm, _ = dynamo_graph(model, x)
    return gm


def test_rewrites_the_graph_object_inductor_holds():
    gm = _graph()
    graph = gm.graph
    with mst_compile.config_context(num_chunks=2):
        inductor_pass.MSTPreGradPass()(graph)
    assert gm.graph is graph
    assert len(calls(gm, "rowwise")) == mst_compile.counters["mlp_rewritten"] > 0


def test_a_failing_rewrite_leaves_the_graph_as_it_was(monkeypatch):
    """NOTE [inductor-pass mode, copy then swap]: the pass fails half-way, after changing its copy."""
    gm = _graph()
    before = gm.code

    def broken(g, ctx):
        mst_compile.passes.dynamo.mlp.rewrite(g, ctx)
        raise RuntimeError("injected")

    monkeypatch.setattr(mst_compile.passes, "PASSES", mst_compile.passes.PASSES[:-1] + (("mlp", broken, True),))
    with pytest.warns(UserWarning, match="injected"):
        inductor_pass.MSTPreGradPass()(gm.graph)
    gm.recompile()
    assert gm.code == before
    assert mst_compile.last_report().fallback


def test_install_chains_with_a_pass_already_there():
    def users_pass(graph):
        pass

    cfg = torch._inductor.config
    # Inductor's config.patch, not monkeypatch (which deletes a config key on undo)
    timing = {"pre_grad_pass_timing": cfg.pre_grad_pass_timing} if hasattr(cfg, "pre_grad_pass_timing") else {}
    with cfg.patch(pre_grad_custom_pass=users_pass, **timing):
        inductor_pass.install()
        inductor_pass.install()  # idempotent
        slot = mst_compile._compat.custom_graph_passes(cfg.pre_grad_custom_pass)
        assert len(slot) == 2 and slot[0] is users_pass
        inductor_pass.uninstall()
        assert cfg.pre_grad_custom_pass is users_pass
