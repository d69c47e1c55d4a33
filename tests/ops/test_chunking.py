import pytest

from mst_compile.ops.chunking import chunk_bounds, num_chunks_for


@pytest.mark.parametrize("rows", [0, 1, 2, 7, 8, 9, 100, 101])
@pytest.mark.parametrize("m,r", [(1, 0), (4, 0), (8, 0), (0, 3), (0, 64), (8, 16), (64, 512)])
def test_bounds_cover_every_row_once(rows, m, r):
    bounds = chunk_bounds(rows, m, r)
    covered = [i for s, e in bounds for i in range(s, e)]
    assert covered == list(range(rows))
    assert all(e > s for s, e in bounds)


def test_counts():
    assert num_chunks_for(100, 8, 0) == 8
    assert num_chunks_for(3, 8, 0) == 3  # fewer tokens than chunks: one token per chunk
    assert num_chunks_for(100, 0, 30) == 4
    assert num_chunks_for(8192, 63, 512) == 16  # auto count, bounded by the minimum chunk size
    assert num_chunks_for(100, 63, 512) == 1
    assert [e - s for s, e in chunk_bounds(10, 3, 0)] == [4, 4, 2]  # ragged last chunk
