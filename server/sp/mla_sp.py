"""Multi-head latent attention over SP-sharded latents (docs/sp.md: Multi-head latent attention).

What moves between SP ranks is the latent cache entry, ``c_kv [L]`` and ``k_pe [R]`` per token (576 values at
DeepSeek-V3's shapes), never per-head K/V:

- :func:`mla_ring_prefill`: the pass-KV ring of :func:`server.sp.ring_attention.ring_attention` (or its all-gather
  comparison mode) with ``(c_kv, k_pe)`` as the two messages of a block; each rank expands the block it holds
  (``form="expanded"``: ``k_nope = W_UK c_kv``, ``v = W_UV c_kv``) or attends to it in latent space
  (``form="absorbed"``: partials merged in latent space, one up-projection at the end).
- :func:`mla_decode_over_sp`: replicated decode queries, each SP rank attends in the absorbed form to the latents it
  holds, the partial ``(o_lat, lse)`` are merged over SP in latent space (:func:`server.sp.ring_attention.
  merge_over_sp`: one all-gather, no host sync, so it runs inside a CUDA graph), then ``o_h = W_UV_h o_lat``.
  Merging after the up-projection would be exact too (it is linear) and gathers ``Dv`` instead of ``L`` values
  per head; the latent merge keeps one up-projection per step on the merged rows.
"""

from __future__ import annotations

import functools

import torch

from server.kernels.mla_ref import (
    mla_absorb_queries,
    mla_expanded_attention,
    mla_latent_attention,
    mla_up_project,
)
from server.kernels.ops import Run
from server.sp.groups import ParallelState
from server.sp.ring_attention import allgather_kv_attention, merge_over_sp, ring_attention

MLA_FORMS = ("expanded", "absorbed")


def _absorbed_block(q_lat, c_kv, k_pe, q_runs, k_runs, scale):
    """A ring block in latent space: the messages arrive as ``[N, 1, L]`` and ``[N, 1, R]``."""
    return mla_latent_attention(q_lat, c_kv[:, 0], k_pe[:, 0], q_runs, k_runs, scale)


def _expanded_block(q, c_kv, k_pe, q_runs, k_runs, scale, kv_b, nope, v_dim):
    return mla_expanded_attention(q, c_kv[:, 0], k_pe[:, 0], q_runs, k_runs, scale, kv_b, nope, v_dim)


def mla_ring_prefill(
    q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, q_runs: list[Run],
    kv_runs_per_rank: list[list[Run]], kv_b: torch.Tensor, nope: int, v_dim: int, scale: float,
    pstate: ParallelState, form: str = "expanded", mode: str = "ring",
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's queries ``q_nope [Nq, H, Dn]``, ``q_pe [Nq, H, R]`` (roped) against every SP rank's latents;
    ``c_kv [Nk_r, L]``, ``k_pe [Nk_r, R]`` are this rank's, described by ``kv_runs_per_rank[sp_rank]``; ``kv_b``
    the ``kv_b_proj`` weight of this rank's heads. Returns ``o [Nq, H, Dv]`` (q's dtype) and base-2 ``lse [Nq, H]``,
    what expanded attention over the whole sequence gives. ``mode``: ``"ring"`` or ``"allgather"``."""
    if form not in MLA_FORMS:
        raise ValueError(f"MLA form must be one of {MLA_FORMS}, got {form!r}")
    if mode not in ("ring", "allgather"):
        raise ValueError(f"MLA SP mode must be ring or allgather, got {mode!r}")
    run = ring_attention if mode == "ring" else allgather_kv_attention
    blocks = (c_kv.unsqueeze(1).contiguous(), k_pe.unsqueeze(1).contiguous())  # one "head" each: the messages
    if form == "absorbed":
        q_lat = mla_absorb_queries(q_nope, q_pe, kv_b.to(q_nope.dtype), nope, v_dim)
        if q_lat.shape[0] == 0:
            return q_nope.new_zeros(0, q_nope.shape[1], v_dim), q_nope.new_zeros(0, q_nope.shape[1]).float()
        o_lat, lse = run(q_lat, *blocks, q_runs, kv_runs_per_rank, scale, pstate, attn_fn=_absorbed_block)
        return mla_up_project(o_lat, kv_b, nope, v_dim).to(q_nope.dtype), lse
    if q_nope.shape[0] == 0:
        return q_nope.new_zeros(0, q_nope.shape[1], v_dim), q_nope.new_zeros(0, q_nope.shape[1]).float()
    attn = functools.partial(_expanded_block, kv_b=kv_b, nope=nope, v_dim=v_dim)
    return run(torch.cat([q_nope, q_pe], dim=-1), *blocks, q_runs, kv_runs_per_rank, scale, pstate, attn_fn=attn)


def mla_decode_over_sp(
    q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, q_runs: list[Run],
    k_runs: list[Run], kv_b: torch.Tensor, nope: int, v_dim: int, scale: float, pstate: ParallelState,
) -> torch.Tensor:
    """Replicated queries (the same on every SP rank) against this rank's latents, absorbed form, merged over SP in
    latent space, then up-projected: ``o [Nq, H, Dv]`` in q's dtype, the same on every SP rank."""
    q_lat = mla_absorb_queries(q_nope, q_pe, kv_b.to(q_nope.dtype), nope, v_dim)
    o_lat, lse = mla_latent_attention(q_lat, c_kv, k_pe, q_runs, k_runs, scale)
    o_lat, _ = merge_over_sp(o_lat, lse, pstate)
    return mla_up_project(o_lat, kv_b, nope, v_dim).to(q_nope.dtype)


def mla_ring_bytes_per_token(kv_lora_rank: int, qk_rope_head_dim: int, itemsize: int) -> int:
    """Bytes one token adds to a ring message: its latent and rotary key, independent of the head count."""
    return (kv_lora_rank + qk_rope_head_dim) * itemsize


def expanded_ring_bytes_per_token(kv_heads: int, qk_head_dim: int, v_head_dim: int, itemsize: int) -> int:
    """Bytes one token adds to a ring message of expanded K/V (``kv_heads`` of this TP rank)."""
    return kv_heads * (qk_head_dim + v_head_dim) * itemsize
