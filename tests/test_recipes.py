"""``compile_per_layer`` (NOTE [per-layer compile and the mask]) in one process without FSDP: the layout (a graph
per layer, one for head + loss) and parity. The mask regression itself needs FSDP2's graph breaks at every layer
(without them Dynamo inlines the layers into the root graph): ``tests/test_distributed.py``, two ranks."""

import torch

import mst_compile
from mst_compile.bench import zoo


def _recording(seen):
    def backend(gm, example_inputs, options=None):
        seen.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return mst_compile.mst_backend(gm, example_inputs, options={"num_chunks": 3, "compiler": "aot_eager"})

    return backend


def test_no_layer_graph_gets_a_tokens_by_tokens_mask_and_grads_match():
    torch.manual_seed(0)
    ref = zoo.build("llama")
    model = zoo.build("llama")
    model.load_state_dict(ref.state_dict())
    ids = torch.randint(3, zoo.V, (2, 20))
    torch._dynamo.reset()
    mst_compile.reset_counters()
    seen = []
    mst_compile.compile_per_layer(model, backend=_recording(seen))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    ref_loss = ref(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    square = [s for shapes in seen for s in shapes if s[-2:] == (20, 20)]
    assert seen and not square, seen
    hidden = (2, 20, model.config.hidden_size)
    assert [shapes[0] for shapes in seen].count(hidden) >= 1, seen  # a layer graph of its own (one serves both)
    assert len(seen) >= 2, seen  # ... and the root's head + loss graph
    # every layer graph chunks its MLP (one graph serves both layers), the root graph chunks the head
    assert mst_compile.counters["mlp_rewritten"] >= 1 and mst_compile.counters["head_rewritten"] == 1
    torch.testing.assert_close(loss, ref_loss)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_layers_are_found_or_must_be_given():
    import pytest

    with pytest.raises(ValueError, match="layers="):
        mst_compile.compile_per_layer(torch.nn.Linear(2, 2))
