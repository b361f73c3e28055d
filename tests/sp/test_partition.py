from itertools import pairwise

import pytest

from server.sp.partition import zigzag_chunks, zigzag_owner, zigzag_partition


@pytest.mark.parametrize("sp", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n", [0, 1, 3, 7, 8, 15, 16, 17, 1001])
def test_chunks_cover_in_order_with_near_equal_sizes(n: int, sp: int) -> None:
    chunks = zigzag_chunks(n, sp)
    assert len(chunks) == 2 * sp
    assert chunks[0][0] == 0 and chunks[-1][1] == n
    for (_, end), (start, _) in pairwise(chunks):
        assert end == start
    sizes = [e - s for s, e in chunks]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # larger chunks first


def test_chunk_sizes_examples() -> None:
    assert zigzag_chunks(10, 2) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert zigzag_chunks(3, 2) == [(0, 1), (1, 2), (2, 3), (3, 3)]
    assert zigzag_chunks(0, 1) == [(0, 0), (0, 0)]


@pytest.mark.parametrize("sp", [1, 2, 3, 4])
def test_owner_is_zigzag_and_each_rank_owns_two_chunks(sp: int) -> None:
    owners = [zigzag_owner(c, sp) for c in range(2 * sp)]
    assert owners == list(range(sp)) + list(reversed(range(sp)))
    for r in range(sp):
        assert sorted(c for c, o in enumerate(owners) if o == r) == [r, 2 * sp - 1 - r]


@pytest.mark.parametrize("chunk", [-1, 4])
def test_owner_rejects_out_of_range(chunk: int) -> None:
    with pytest.raises(ValueError, match="chunk must be in"):
        zigzag_owner(chunk, 2)


def test_chunks_reject_bad_sizes() -> None:
    with pytest.raises(ValueError):
        zigzag_chunks(-1, 2)
    with pytest.raises(ValueError):
        zigzag_chunks(5, 0)


@pytest.mark.parametrize("sp", [1, 2, 4])
@pytest.mark.parametrize("n", [3, 37, 64])
def test_partition_gives_every_token_to_exactly_one_rank(n: int, sp: int) -> None:
    parts = zigzag_partition(n, sp)
    chunks = zigzag_chunks(n, sp)
    assert len(parts) == sp
    seen = []
    for r, pieces in enumerate(parts):
        assert pieces == [chunks[r], chunks[2 * sp - 1 - r]]
        seen += [t for s, e in pieces for t in range(s, e)]
    assert sorted(seen) == list(range(n))


def test_partition_balances_causal_work() -> None:
    """Visible (query, key) pairs per rank differ by far less than with a contiguous split."""
    n, sp = 4096, 4

    def causal_pairs(pieces: list[tuple[int, int]]) -> int:
        return sum((e * (e + 1) - s * (s + 1)) // 2 for s, e in pieces)

    work = [causal_pairs(p) for p in zigzag_partition(n, sp)]
    assert max(work) / min(work) < 1.01
