"""NOTE [body spec]: each op's one string argument round-trips to the same frozen spec, and names its kind."""

import pytest
import torch

from mst_compile.ops import registry
from mst_compile.ops.chunking import Chunks
from mst_compile.ops.spec import BodySpec, HeadSpec, RowwiseSpec, parse


def test_specs_round_trip_through_their_string():
    cast = registry.register_cast(torch.bfloat16, ("cpu", torch.bfloat16))
    head = HeadSpec(cast, cast, -1, 0.1, Chunks(0, 512), (True, False, True), want_logits=True, mean=False)
    rows = RowwiseSpec(cast, Chunks(8))
    for spec in (head, rows, parse(cast)):
        assert parse(spec.dumps(), type(spec)) == spec
    assert parse(head.dumps(), HeadSpec).needs == (True, False, True)  # a tuple again: frozen, hashable
    assert parse(cast).amp == ("cpu", torch.bfloat16)


def test_a_changed_field_is_a_different_string():
    cast = registry.register_cast(torch.float32)
    base = HeadSpec(cast, cast)
    for other in (HeadSpec(cast, cast, chunks=Chunks(2)), HeadSpec(cast, cast, mean=False),
                  HeadSpec(cast, cast, needs=(True, True, False))):  # fmt: skip
        assert other.dumps() != base.dumps()


def test_a_string_of_another_kind_is_refused():
    cast = registry.register_cast(torch.float32)
    with pytest.raises(ValueError, match="not a RowwiseSpec"):
        parse(cast, RowwiseSpec)
    with pytest.raises(ValueError, match="not a BodySpec"):
        parse(RowwiseSpec(cast).dumps())
    assert isinstance(parse(cast), BodySpec)
