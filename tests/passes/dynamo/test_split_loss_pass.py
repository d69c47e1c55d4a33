"""Pattern matching on traced graphs: a cross-entropy over split pieces of the logits, summed (litgpt's
``chunked_cross_entropy``), becomes one cross-entropy the head pass fuses."""

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import assert_close_rel, calls, regions, rewrite


def litgpt_chunked_cross_entropy(logits, targets, chunk_size=128, ignore_index=-100):
    """litgpt 0.5's ``chunked_cross_entropy`` for unchunked logits, as it is written there."""
    logits = logits.reshape(-1, logits.size(-1))
    targets = targets.reshape(-1)
    logit_chunks = logits.split(chunk_size)
    target_chunks = targets.split(chunk_size)
    loss_chunks = [F.cross_entropy(lc, tc, ignore_index=ignore_index, reduction="none")
                   for lc, tc in zip(logit_chunks, target_chunks)]  # fmt: skip
    non_masked_elems = (targets != ignore_index).sum()
    return torch.cat(loss_chunks).sum() / non_masked_elems.maximum(torch.ones_like(non_masked_elems))


class Head(torch.nn.Module):
    def __init__(self, loss, h=16, v=50):
        super().__init__()
        torch.manual_seed(0)
        self.proj, self.loss = torch.nn.Linear(h, v, bias=False), loss

    def forward(self, x, y):
        return self.loss(self.proj(x), y)


def _data(ignored: int = 3):
    x = torch.randn(2, 10, 16, requires_grad=True)
    y = torch.randint(0, 50, (2, 10))
    y[0, :ignored] = -100
    return x, y


def test_split_pieces_become_one_fused_cross_entropy():
    head = Head(lambda z, y: litgpt_chunked_cross_entropy(z, y, chunk_size=6))  # 20 rows: pieces 6, 6, 6, 2
    x, y = _data()
    gm, ctx, ex = rewrite(head, x, y)
    assert len(calls(gm, "linear_ce")) == 1 and len(regions(ctx, "head", "rewritten")) == 1, ctx.regions
    assert not [n for n in gm.graph.nodes if n.target is F.cross_entropy]
    ref = head(x, y)
    ref_grads = torch.autograd.grad(ref, [x, head.proj.weight])
    out = gm(*ex)[0]
    assert_close_rel(out, ref, name="loss")
    for g, r in zip(torch.autograd.grad(out, [x, head.proj.weight]), ref_grads):
        assert_close_rel(g, r)


def _mean_of_pieces(z, y):
    z, y = z.reshape(-1, 50), y.reshape(-1)
    return torch.cat([F.cross_entropy(a, b, reduction="none") for a, b in zip(z.split(6), y.split(6))]).mean()


def _pieces_read_twice(z, y):
    z, y = z.reshape(-1, 50), y.reshape(-1)
    zs, ys = z.split(6), y.split(6)
    return torch.cat([F.cross_entropy(a, b, reduction="none") for a, b in zip(zs, ys)]).sum() + zs[0].sum()


def _other_split_of_targets(z, y):
    z, y = z.reshape(-1, 50), y.reshape(-1)
    return torch.cat([F.cross_entropy(a, b, reduction="none") for a, b in zip(z.split(10), y.split([10, 10]))]).sum()


def _some_pieces(z, y):
    z, y = z.reshape(-1, 50), y.reshape(-1)
    pairs = list(zip(z.split(6), y.split(6)))[:3]
    return torch.cat([F.cross_entropy(a, b, reduction="none") for a, b in pairs]).sum()


@pytest.mark.parametrize("loss", [_mean_of_pieces, _pieces_read_twice, _other_split_of_targets, _some_pieces],
                         ids=["mean", "piece read twice", "other split", "not every piece"])  # fmt: skip
def test_other_piecewise_losses_are_left_as_they_were(loss):
    """A mean over the pieces (ignored rows counted), a piece read elsewhere, targets split another way, or
    not every piece: not one cross-entropy's sum, so the graph keeps its pieces and gives eager's value."""
    head = Head(loss)
    x, y = _data(ignored=0)
    gm, ctx, ex = rewrite(head, x, y)
    assert not calls(gm, "linear_ce") and sum(n.target is F.cross_entropy for n in gm.graph.nodes) >= 2
    assert_close_rel(gm(*ex)[0], head(x, y), name="loss")
