"""Zigzag partition of one request's new tokens over an SP group (docs/sp.md: Partition).

The tokens ``[0, n)`` are cut into ``2P`` contiguous chunks (P = sp_size) whose sizes differ by at most one,
larger chunks first; rank r owns chunks ``r`` and ``2P-1-r``. Under a causal mask chunk c costs about
``c + 1/2`` chunk-pairs of attention, so every rank's two chunks cost ``(r + 1/2) + (2P-1-r + 1/2) = 2P``:
the work is balanced. Chunks are empty when ``n < 2P``.
"""

from __future__ import annotations


def zigzag_chunks(n_tokens: int, sp_size: int) -> list[tuple[int, int]]:
    """The ``2 * sp_size`` chunks ``(start, end)`` covering ``[0, n_tokens)`` in sequence order."""
    if n_tokens < 0 or sp_size < 1:
        raise ValueError(f"zigzag_chunks needs n_tokens >= 0 and sp_size >= 1, got {n_tokens} and {sp_size}")
    n_chunks = 2 * sp_size
    base, extra = divmod(n_tokens, n_chunks)
    chunks = []
    start = 0
    for c in range(n_chunks):
        end = start + base + (1 if c < extra else 0)
        chunks.append((start, end))
        start = end
    return chunks


def zigzag_owner(chunk: int, sp_size: int) -> int:
    """SP rank that owns ``chunk`` (0 <= chunk < 2 * sp_size)."""
    if not 0 <= chunk < 2 * sp_size:
        raise ValueError(f"chunk must be in [0, {2 * sp_size}) for sp_size={sp_size}, got {chunk}")
    return chunk if chunk < sp_size else 2 * sp_size - 1 - chunk


def zigzag_partition(n_tokens: int, sp_size: int) -> list[list[tuple[int, int]]]:
    """Per SP rank r, its two chunks in sequence order: ``[chunk r, chunk 2P-1-r]`` as ``(start, end)``."""
    chunks = zigzag_chunks(n_tokens, sp_size)
    return [[chunks[r], chunks[2 * sp_size - 1 - r]] for r in range(sp_size)]


def rank_chunks(n_tokens: int, sp_size: int, sp_rank: int) -> list[tuple[int, int, int]]:
    """The chunks SP rank ``sp_rank`` owns, in sequence order, as ``(start, end, chunk_index)`` relative to the
    first new token. The one place the zigzag rule is applied to a request (scheduler, workers, LASP, GDN)."""
    chunks = zigzag_chunks(n_tokens, sp_size)
    a, b = sp_rank, 2 * sp_size - 1 - sp_rank
    return [(*chunks[a], a), (*chunks[b], b)]
