"""Pattern matching on traced graphs: a tensor filled and then written row by row in an unrolled loop (litgpt's
sliding-window mask) becomes one ``masked_fill`` (NOTE [unrolled row writes])."""

import operator

import pytest
import torch

from tests.conftest import regions, rewrite

T, W = 24, 7


def litgpt_sliding_window_mask(x):
    """litgpt 0.5's sliding-window mask, as its attention writes it, applied to ``x``."""
    t = x.shape[-1]
    mask = torch.full((t, t), float("-inf"), dtype=x.dtype, device=x.device)
    for i in range(t):
        start = max(0, i - W + 1)
        mask[i, start : i + 1] = 0.0
    return (x + mask.view(1, 1, t, t)).softmax(-1)


def _setitems(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.setitem]


def test_unrolled_sliding_window_mask_is_one_masked_fill():
    x = torch.randn(1, 2, T, T)
    gm, ctx, ex = rewrite(litgpt_sliding_window_mask, x)
    assert [r.status for r in regions(ctx, "rows")] == ["rewritten"]
    assert not _setitems(gm) and [n.target for n in gm.graph.nodes].count("masked_fill") == 1
    torch.testing.assert_close(gm(*ex)[0], litgpt_sliding_window_mask(x), rtol=0, atol=0)


def test_general_rows_with_gaps_and_open_slices():
    """Rows left unwritten, slices open at either end: each row's bounds are read off the graph."""

    def fn(x):
        m = torch.full((T, 10), 0.0)
        for i in range(0, T, 2):
            m[i, (i % 5) :] = 3.0
        m[1, :4] = 3.0
        return x * m

    x = torch.randn(T, 10)
    gm, ctx, ex = rewrite(fn, x)
    assert [r.status for r in regions(ctx, "rows")] == ["rewritten"]
    torch.testing.assert_close(gm(*ex)[0], fn(x), rtol=0, atol=0)


@pytest.mark.parametrize("case", ["two_values", "row_twice", "read_between", "few_writes"])
def test_anything_else_is_left_alone(case):
    def fn(x):
        m = torch.full((T, T), -1.0)
        partial = None
        for i in range(T if case != "few_writes" else 1):
            m[i, : i + 1] = 2.0 if (case == "two_values" and i == 5) else 0.0
            if case == "read_between" and i == 3:
                partial = m.sum()
        if case == "row_twice":
            m[2, 4:6] = 0.0
        out = x + m
        return out if partial is None else out * partial

    x = torch.randn(T, T)
    gm, ctx, ex = rewrite(fn, x)
    assert not regions(ctx, "rows")
    assert _setitems(gm)
    torch.testing.assert_close(gm(*ex)[0], fn(x))
