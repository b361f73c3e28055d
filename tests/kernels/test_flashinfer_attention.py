"""Position-run attention split into full / causal pieces (the flashinfer backend) vs the position-mask reference.

On CPU the per-piece kernel is the reference itself, so these tests check the decomposition and the merging:
every visible (query, key) pair covered exactly once, nothing invisible computed, rows that see no key at
lse = -inf. On a GPU the pieces run on flashinfer in bf16.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined

import pytest  # noqa: E402

from server.kernels.attention_ref import attention_with_lse_ref  # noqa: E402
from server.kernels.flashinfer_attention import (  # noqa: E402
    AttentionPiece,
    attention_runs_by_pieces,
    attention_runs_flashinfer,
    decompose_runs,
)
from server.runs import runs_to_positions
from tests.helpers import DEVICE, gpu, needs_flashinfer  # noqa: E402


def ref_piece(q, k, v, causal: bool, scale: float):
    """A piece on the reference: bottom-right causal means query i sees keys j <= i + Lk - Lq."""
    lq, lk = q.shape[0], k.shape[0]
    k_pos = torch.arange(lk, device=q.device)
    q_pos = torch.arange(lq, device=q.device) + (lk - lq) if causal else torch.full((lq,), lk, device=q.device)
    return attention_with_lse_ref(q, k, v, q_pos, k_pos, scale)


# name -> (q_runs, k_runs); rows are packed in run order, positions are global.
LAYOUTS = {
    "causal_diagonal": ([(0, 37, 0)], [(0, 37, 0)]),
    "full_block": ([(0, 20, 50)], [(0, 30, 10)]),
    "keys_after_queries": ([(0, 8, 0)], [(0, 16, 40)]),
    "prefix_then_new": ([(0, 13, 29)], [(0, 29, 0), (29, 13, 29)]),
    # zigzag, P = 3, chunk 11: rank 1 owns chunks 1 and 4; keys of rank 0 (chunks 0, 5), then its own.
    "zigzag_earlier_rank": ([(0, 11, 11), (11, 11, 44)], [(0, 11, 0), (11, 11, 55)]),
    "zigzag_own_chunks": ([(0, 11, 11), (11, 11, 44)], [(0, 11, 11), (11, 11, 44)]),
    "zigzag_later_rank": ([(0, 11, 11), (11, 11, 44)], [(0, 11, 22), (11, 11, 33)]),
    "decode_one_query": ([(0, 1, 70)], [(0, 40, 0), (40, 31, 40)]),
    "overlapping_uneven": ([(0, 9, 5), (9, 20, 30)], [(0, 25, 3), (25, 7, 40), (32, 4, 60)]),
    # zigzag, P = 2, chunks of 4 x 6 tokens: rank 0 in its 4th chunk (positions 72..77 and 90..95) against its own
    # shard (two runs per chunk, then the chunk's own two) and against rank 1's shard
    "zigzag_4th_chunk_own": ([(0, 6, 72), (6, 6, 90)],
                             [(2 * c * 6 + i * 6, 6, c * 24 + (0, 18)[i]) for c in range(4) for i in (0, 1)]),
    "zigzag_4th_chunk_other": ([(0, 6, 72), (6, 6, 90)],
                               [(2 * c * 6 + i * 6, 6, c * 24 + (6, 12)[i]) for c in range(4) for i in (0, 1)]),
}


def run_layout(name: str, hq: int, hk: int, d: int, dtype, seed: int):
    q_runs, k_runs = LAYOUTS[name]
    g = torch.Generator().manual_seed(seed)
    nq, nk = sum(n for _, n, _ in q_runs), sum(n for _, n, _ in k_runs)
    q = torch.randn(nq, hq, d, generator=g).to(dtype).to(DEVICE)
    k = torch.randn(nk, hk, d, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(nk, hk, d, generator=g).to(dtype).to(DEVICE)
    return q, k, v, q_runs, k_runs, d**-0.5


def reference(q, k, v, q_runs, k_runs, scale):
    q_pos = runs_to_positions(q_runs, q.device)
    k_pos = runs_to_positions(k_runs, q.device)
    return attention_with_lse_ref(q, k, v, q_pos, k_pos, scale)


def test_decompose_covers_each_visible_pair_once() -> None:
    assert decompose_runs([(0, 8, 0)], [(0, 8, 0)]) == [AttentionPiece(0, 8, 0, 8, causal=True)]
    assert decompose_runs([(0, 4, 10)], [(0, 8, 0)]) == [AttentionPiece(0, 4, 0, 8, causal=False)]
    assert decompose_runs([(0, 4, 0)], [(0, 8, 10)]) == []
    # Queries at 3..12 vs keys at 5..9: rows 2..6 causal over keys 5..9 (ends meet), rows 7..9 see all keys.
    assert decompose_runs([(0, 10, 3)], [(0, 5, 5)]) == [
        AttentionPiece(2, 5, 0, 5, causal=True),
        AttentionPiece(7, 3, 0, 5, causal=False),
    ]
    # Adjacent runs continuing each other are joined first.
    assert decompose_runs([(0, 4, 0), (4, 4, 4)], [(0, 8, 0)]) == [AttentionPiece(0, 8, 0, 8, causal=True)]


def coverage(pieces: list[AttentionPiece], nq: int, nk: int) -> torch.Tensor:
    """How many pieces cover each (query row, key row) pair, with the bottom-right causal mask."""
    count = torch.zeros(nq, nk, dtype=torch.int64)
    for p in pieces:
        for j in range(p.q_len):
            last = p.k_len - p.q_len + j if p.causal else p.k_len - 1
            count[p.q_start + j, p.k_start : p.k_start + max(last + 1, 0)] += 1
    return count


def random_runs(g: torch.Generator, n_runs: int, span: int) -> list[tuple[int, int, int]]:
    """Runs of random lengths at random non-overlapping positions below ``span``, rows packed in run order."""
    starts = sorted(torch.randperm(span, generator=g)[: 2 * n_runs].tolist())
    pairs = [(starts[2 * i], starts[2 * i + 1]) for i in range(n_runs)]
    order = torch.randperm(n_runs, generator=g).tolist() if torch.rand(1, generator=g) < 0.3 else range(n_runs)
    runs, row = [], 0
    for i in order:
        a, b = pairs[i]
        runs.append((row, b - a, a))
        row += b - a
    return runs


@pytest.mark.parametrize("seed", range(120))
def test_decompose_is_an_exact_cover_of_visible_pairs(seed: int) -> None:
    """Random layouts (keys in or out of position order, queries anywhere): every visible pair exactly once."""
    g = torch.Generator().manual_seed(seed)
    k_runs = random_runs(g, int(torch.randint(1, 7, (1,), generator=g)), 60)
    if seed % 2:  # queries anywhere
        q_runs = random_runs(g, int(torch.randint(1, 4, (1,), generator=g)), 60)
    else:  # queries that are keys too (a piece of a key run): the diagonal, after or inside other key runs
        q_runs, row = [], 0
        for _, n, pos in k_runs[: int(torch.randint(1, 3, (1,), generator=g))]:
            a = int(torch.randint(0, n, (1,), generator=g))
            b = int(torch.randint(a + 1, n + 1, (1,), generator=g))
            q_runs.append((row, b - a, pos + a))
            row += b - a
    q_pos = runs_to_positions(q_runs, torch.device("cpu"))
    k_pos = runs_to_positions(k_runs, torch.device("cpu"))
    visible = (k_pos[None, :] <= q_pos[:, None]).long()
    assert torch.equal(coverage(decompose_runs(q_runs, k_runs), len(q_pos), len(k_pos)), visible)


def test_zigzag_shard_after_many_chunks_is_one_piece_per_query_run() -> None:
    """A chunk's queries against a shard of 2c position-ordered key runs: the keys every query sees join the
    diagonal run that follows them in rows (own shard), or form one full piece (another rank's shard)."""
    for name in ("zigzag_4th_chunk_own", "zigzag_4th_chunk_other"):
        q_runs, k_runs = LAYOUTS[name]
        pieces = decompose_runs(q_runs, k_runs)
        assert len(pieces) == 2, (name, pieces)
        nq, nk = sum(n for _, n, _ in q_runs), sum(n for _, n, _ in k_runs)
        q_pos, k_pos = (runs_to_positions(r, torch.device("cpu")) for r in (q_runs, k_runs))
        assert torch.equal(coverage(pieces, nq, nk), (k_pos[None, :] <= q_pos[:, None]).long())


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_pieces_on_reference_match_position_mask(name: str) -> None:
    q, k, v, q_runs, k_runs, scale = run_layout(name, hq=4, hk=2, d=16, dtype=torch.float32, seed=len(name))
    o, lse = attention_runs_by_pieces(q, k, v, q_runs, k_runs, scale, ref_piece)
    ro, rlse = reference(q, k, v, q_runs, k_runs, scale)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rlse))
    finite = ~torch.isneginf(rlse)
    assert torch.allclose(lse[finite], rlse[finite], atol=1e-5)
    assert torch.allclose(o, ro, atol=1e-5)


@gpu
@needs_flashinfer
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_flashinfer_matches_reference_bf16(name: str) -> None:
    """GQA 32/8 heads of dim 128 in bf16; compared with the reference on the same bf16 inputs."""
    q, k, v, q_runs, k_runs, scale = run_layout(name, hq=32, hk=8, d=128, dtype=torch.bfloat16, seed=1)
    o, lse = attention_runs_flashinfer(q, k, v, q_runs, k_runs, scale)
    ro, rlse = reference(q, k, v, q_runs, k_runs, scale)
    assert o.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rlse))
    finite = ~torch.isneginf(rlse)
    assert torch.allclose(lse[finite], rlse[finite], atol=2e-2)
    assert torch.allclose(o.float(), ro.float(), atol=2e-2, rtol=2e-2)


@gpu
@needs_flashinfer
def test_auto_backend_attention_runs_is_flashinfer_on_cuda() -> None:
    """The backend ``auto`` picks for bf16 on CUDA gives flashinfer's answer for the ring's position-run blocks (long
    enough to span several kernel tiles)."""
    from server.backends import make_attention_backend
    from server.backends.attention import AttentionGeometry
    from server.sp.groups import ParallelState

    g = torch.Generator().manual_seed(2)
    n = 1500
    q, k, v = (torch.randn(n, h, 128, generator=g).to(torch.bfloat16).to(DEVICE) for h in (32, 8, 8))
    q_runs, k_runs = [(0, 700, 800), (700, 800, 2200)], [(0, 900, 0), (900, 600, 2300)]
    backend = make_attention_backend("auto", ParallelState(device=torch.device(DEVICE)), 16,
                                     AttentionGeometry(32, 8, 128, 128**-0.5), torch.bfloat16)
    assert backend.name == "flashinfer"
    o, lse = backend.attention_runs(q, k, v, q_runs, k_runs, 128**-0.5)
    fo, flse = attention_runs_flashinfer(q, k, v, q_runs, k_runs, 128**-0.5)
    ro, rlse = reference(q, k, v, q_runs, k_runs, 128**-0.5)
    assert torch.equal(o, fo) and torch.equal(lse, flse)
    assert torch.allclose(o.float(), ro.float(), atol=2e-2, rtol=2e-2)
    assert torch.allclose(lse, rlse, atol=2e-2)
