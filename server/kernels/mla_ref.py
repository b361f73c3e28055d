"""Plain-torch multi-head latent attention pieces: expanding latents, absorbing queries, attending in latent space.

Notation (docs/sp.md: Multi-head latent attention): a token's cache entry is the normalised latent ``c_kv [L]``
(L = kv_lora_rank) and the rotary key ``k_pe [R]``, shared by every head. ``kv_b`` is the checkpoint's
``kv_b_proj`` weight of this rank's heads, ``[H x (Dn + Dv), L]``: head h's rows are ``W_UK_h [Dn, L]`` then
``W_UV_h [Dv, L]``. The score of head h is ``q_nope_h . W_UK_h c_kv + q_pe_h . k_pe``; the output is
``W_UV_h sum_j p_j c_kv_j``.

- Expanded form (long prefill: fewer FLOPs per score): ``k_h = [W_UK_h c_kv | k_pe]``, ``v_h = W_UV_h c_kv``.
- Absorbed form (decode, short extends): ``q~_h = [W_UK_h^T q_nope_h | q_pe_h]`` against ``[c_kv | k_pe]`` with
  values ``c_kv``: MQA with one ``L + R`` key head and one ``L`` value head; ``o_lat`` is linear in the
  probabilities, so partial results over KV shards merge by LSE in latent space and are up-projected once.
LSE is base 2 everywhere (:mod:`server.kernels.attention_ref`).
"""

from __future__ import annotations

import torch

from server.kernels import ops
from server.kernels.ops import Run


def split_kv_b(kv_b: torch.Tensor, nope: int, v_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``kv_b [H x (Dn + Dv), L]`` -> ``W_UK [H, Dn, L]`` and ``W_UV [H, Dv, L]`` (views)."""
    w = kv_b.view(-1, nope + v_dim, kv_b.shape[-1])
    return w[:, :nope], w[:, nope:]


def mla_expand(c_kv: torch.Tensor, k_pe: torch.Tensor, kv_b: torch.Tensor, nope: int, v_dim: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents ``c_kv [N, L]``, ``k_pe [N, R]`` -> per-head ``k [N, H, Dn + R]`` and ``v [N, H, Dv]``."""
    w_uk, w_uv = split_kv_b(kv_b, nope, v_dim)
    k_nope = torch.einsum("hdl,nl->nhd", w_uk, c_kv)
    k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(-1, w_uk.shape[0], -1)], dim=-1)
    return k, torch.einsum("hdl,nl->nhd", w_uv, c_kv)


def mla_absorb_queries(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_b: torch.Tensor, nope: int, v_dim: int
                       ) -> torch.Tensor:
    """``q_nope [N, H, Dn]``, ``q_pe [N, H, R]`` -> latent-space queries ``[N, H, L + R]``."""
    w_uk, _ = split_kv_b(kv_b, nope, v_dim)
    return torch.cat([torch.einsum("hdl,nhd->nhl", w_uk, q_nope), q_pe], dim=-1)


def mla_up_project(o_lat: torch.Tensor, kv_b: torch.Tensor, nope: int, v_dim: int) -> torch.Tensor:
    """Latent outputs ``[N, H, L]`` -> head outputs ``[N, H, Dv]`` (``o_h = W_UV_h o_lat_h``)."""
    _, w_uv = split_kv_b(kv_b, nope, v_dim)
    return torch.einsum("hvl,nhl->nhv", w_uv.to(o_lat.dtype), o_lat)


def mla_latent_attention(q_lat: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, q_runs: list[Run],
                         k_runs: list[Run], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed attention: q_lat ``[Nq, H, L + R]`` against the latents ``c_kv [Nk, L]``, ``k_pe [Nk, R]`` (key j
    visible to query i iff ``pos(k_j) <= pos(q_i)``). Returns ``o_lat [Nq, H, L]`` and base-2 ``lse [Nq, H]``."""
    keys = torch.cat([c_kv, k_pe], dim=-1).unsqueeze(1)
    return ops.attention_runs(q_lat, keys, c_kv.unsqueeze(1), q_runs, k_runs, scale)


def mla_expanded_attention(q: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, q_runs: list[Run],
                           k_runs: list[Run], scale: float, kv_b: torch.Tensor, nope: int, v_dim: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Expanded attention: q ``[Nq, H, Dn + R]`` against the latents, expanded here. Returns ``o [Nq, H, Dv]`` and
    base-2 ``lse [Nq, H]``."""
    k, v = mla_expand(c_kv, k_pe, kv_b.to(c_kv.dtype), nope, v_dim)
    return ops.attention_runs(q, k, v, q_runs, k_runs, scale)
