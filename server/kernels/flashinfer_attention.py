"""Position-run attention (``ops.attention_runs``) on flashinfer's prefill kernel.

A run is ``(row_start, length, pos_start)``; key j is visible to query i iff ``pos(k_j) <= pos(q_i)``. Every
(query run, key run) pair splits by position into at most two rectangles that flashinfer computes natively:

- query rows at or after the key run's last position see every key: a *full* piece;
- query rows inside the key run's span see a prefix of it. flashinfer's causal mask is aligned bottom-right
  (query i of Lq sees keys ``j <= i + Lk - Lq``), so the piece takes the keys up to the last of those queries'
  positions, which makes the ends of both ranges meet: a *causal* piece;
- query rows before the key run see nothing: skipped, never computed, never merged.

Pieces that share query rows are merged by their base-2 LSE in fp32. :func:`attention_runs_by_pieces` holds the
decomposition and takes the per-piece kernel as an argument, so the same code runs on a reference on CPU.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import torch

from server.kernels import ops
from server.runs import coalesce_runs

Run = tuple[int, int, int]
# (q [Lq, Hq, D], k [Lk, Hk, D], v [Lk, Hk, D], causal, scale) -> (o [Lq, Hq, D], lse [Lq, Hq] fp32 base 2)
PieceAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float], tuple[torch.Tensor, torch.Tensor]]

FLASHINFER_HEAD_DIMS = (64, 128, 256)


@dataclass(frozen=True)
class AttentionPiece:
    """Query rows ``q_start..q_start+q_len`` against key rows ``k_start..k_start+k_len``; ``causal`` means the
    bottom-right aligned causal mask, otherwise every key is visible."""

    q_start: int
    q_len: int
    k_start: int
    k_len: int
    causal: bool


def decompose_runs(q_runs: list[Run], k_runs: list[Run]) -> list[AttentionPiece]:
    """The full and causal pieces that together cover exactly the visible (query, key) pairs.

    Keys that every query of a run sees (all their positions before its first query) join into one piece when they
    are contiguous in rows, and they join the causal piece of the key run on the queries' diagonal when it follows
    them in rows (bottom-right alignment keeps the mask exact). A zigzag SP shard after c prefill chunks is 2c
    key runs: without the joins a chunk's ring step would be one kernel call and one merge per run and layer.
    """
    pieces = []
    keys = coalesce_runs(k_runs)
    for q_row, q_n, q_pos in coalesce_runs(q_runs):
        q_end = q_pos + q_n
        seen: tuple[int, int] | None = None  # rows [a, b) every query sees, contiguous, not yet in a piece
        for k_row, k_n, k_pos in keys:
            k_end = k_pos + k_n  # first position after the key run
            if k_end <= q_pos:  # every query sees the whole run
                if seen is not None and seen[1] == k_row:
                    seen = (seen[0], k_row + k_n)
                else:
                    if seen is not None:
                        pieces.append(AttentionPiece(q_row, q_n, seen[0], seen[1] - seen[0], causal=False))
                    seen = (k_row, k_row + k_n)
                continue
            if k_pos >= q_end:  # no query sees it
                continue
            lead = 0  # rows of `seen` joined in front of this run's pieces
            if seen is not None and seen[1] == k_row and k_pos <= q_pos:
                lead, seen = seen[1] - seen[0], None
            # Queries at positions [c0, c1) see keys [k_pos, q_pos_i]: causal, keys cut at c1 so the ends meet.
            c0, c1 = max(q_pos, k_pos), min(q_end, k_end)
            pieces.append(AttentionPiece(q_row + c0 - q_pos, c1 - c0, k_row - lead, lead + c1 - k_pos, causal=True))
            # Queries at positions >= k_end see the whole key run.
            f0 = max(q_pos, k_end)
            if q_end > f0:
                pieces.append(AttentionPiece(q_row + f0 - q_pos, q_end - f0, k_row - lead, lead + k_n, causal=False))
        if seen is not None:
            pieces.append(AttentionPiece(q_row, q_n, seen[0], seen[1] - seen[0], causal=False))
    return pieces


def attention_runs_by_pieces(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_runs: list[Run],
    k_runs: list[Run],
    scale: float,
    piece_attention: PieceAttention,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_runs`` semantics with each piece computed by ``piece_attention``.

    q ``[Nq, Hq, D]``, k/v ``[Nk, Hk, D]``. Returns ``o [Nq, Hq, D]`` (q's dtype) and ``lse [Nq, Hq]`` fp32 base 2,
    ``-inf`` (and o = 0) for rows that see no key.
    """
    nq, hq = q.shape[:2]
    pieces = decompose_runs(q_runs, k_runs)
    if len(pieces) == 1 and pieces[0].q_start == 0 and pieces[0].q_len == nq:
        p = pieces[0]
        return piece_attention(q, k[p.k_start:p.k_start + p.k_len], v[p.k_start:p.k_start + p.k_len], p.causal, scale)
    # Pieces on disjoint rows are written in place; rows several pieces share are merged in fp32, so that
    # merging adds no half-precision rounding.
    spans = sorted((p.q_start, p.q_start + p.q_len) for p in pieces)
    disjoint = all(end <= nxt for (_, end), (nxt, _) in pairwise(spans))
    acc_dtype = q.dtype if disjoint else torch.float32
    o_acc = torch.zeros(nq, hq, v.shape[-1], dtype=acc_dtype, device=q.device)
    lse_acc = torch.full((nq, hq), -math.inf, dtype=torch.float32, device=q.device)
    for p in pieces:
        qs, ks = slice(p.q_start, p.q_start + p.q_len), slice(p.k_start, p.k_start + p.k_len)
        o_p, lse_p = piece_attention(q[qs], k[ks], v[ks], p.causal, scale)
        if disjoint:
            o_acc[qs], lse_acc[qs] = o_p, lse_p
        else:
            ops.merge_state_into(o_acc[qs], lse_acc[qs], o_p, lse_p)
    return o_acc.to(q.dtype), lse_acc


@functools.cache
def flashinfer_module():
    """The ``flashinfer`` package, or None where it is not installed."""
    try:
        import flashinfer
    except ImportError:
        return None
    return flashinfer


def flashinfer_supports(q: torch.Tensor, k: torch.Tensor) -> bool:
    """True when flashinfer is importable and takes these inputs (CUDA, fp16/bf16, head dim 64/128/256)."""
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and k.dtype == q.dtype
        and q.shape[-1] in FLASHINFER_HEAD_DIMS
        and q.shape[1] % k.shape[1] == 0
        and flashinfer_module() is not None
    )


def flashinfer_piece(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One piece on ``flashinfer.single_prefill_with_kv_cache`` (NHD layout, LSE in base 2)."""
    o, lse = flashinfer_module().single_prefill_with_kv_cache(
        q, k, v, causal=causal, sm_scale=scale, kv_layout="NHD", return_lse=True
    )
    return o, lse


def attention_runs_flashinfer(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_runs: list[Run], k_runs: list[Run], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`server.kernels.ops.attention_runs` on flashinfer (see :func:`flashinfer_supports` for the inputs)."""
    return attention_runs_by_pieces(q, k, v, q_runs, k_runs, scale, flashinfer_piece)
