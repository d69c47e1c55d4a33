"""Returned logits behave as eager's: edited in place, differentiated twice, used in a second loss."""

import pytest
import torch

from tests.conftest import assert_close_rel, grads


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    return LlamaForCausalLM(cfg)


def _mul_then_loss(o):
    o.logits.mul_(2.0)
    o.loss.backward()


def _mul_then_both(o):
    o.logits.mul_(2.0)
    (o.loss + o.logits.sum()).backward()


def _second_loss(o):
    (o.loss + o.logits.float().pow(2).mean()).backward()


def _retain_twice(o):
    s = o.logits.sum()
    s.backward(retain_graph=True)
    o.loss.backward(retain_graph=True)
    s.backward()


@pytest.mark.parametrize("use", [_mul_then_loss, _mul_then_both, _second_loss, _retain_twice],
                         ids=["mul_-then-loss", "mul_-then-both", "second-loss", "retain-graph-twice"])  # fmt: skip
def test_what_eager_allows_on_the_logits(use):
    """NOTE [logits edited in place]"""
    model = _model()
    ids = torch.randint(0, 300, (1, 48), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, labels=ids)
    use(out)
    ref_logits, ref = out.logits.detach().clone(), grads(model)
    model.zero_grad(set_to_none=True)
    cm = torch.compile(model, backend="mst", options={"compiler": "aot_eager"})
    out = cm(input_ids=ids, labels=ids)
    use(out)
    torch.testing.assert_close(out.logits.detach(), ref_logits)
    got = grads(model)
    assert set(got) == set(ref)
    for n in ref:
        assert_close_rel(got[n], ref[n], rtol=1e-5, name=n)
