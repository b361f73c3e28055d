"""Bytes one rank sends per softmax-attention layer when an SP group prefills one prompt, by SP method.

For docs and benchmark tables (docs/sp.md). N tokens split evenly over the P SP ranks; head counts are per TP rank
(the model's heads / ``--tp-size``), head dim D for q, k and v, ``dtype_bytes`` per element. A rank receives as much
as it sends. Not counted: the padding of uneven shards, LSE and metadata, and whether the bytes overlap compute (the
ring's do, the all-to-alls' do not).
"""

from __future__ import annotations


def ring_bytes_per_layer(n_tokens: int, kv_heads: int, head_dim: int, sp_size: int, dtype_bytes: int = 2) -> float:
    """Pass-KV ring: a rank forwards P - 1 blocks of N / P tokens' K and V, ``(P - 1) / P * N * 2 * Hk * D * b``.

    The all-gather-KV variant sends the same bytes (its shard to each of P - 1 peers).
    """
    return (sp_size - 1) / sp_size * n_tokens * 2 * kv_heads * head_dim * dtype_bytes


def latent_ring_bytes_per_layer(n_tokens: int, latent_width: int, sp_size: int, dtype_bytes: int = 2) -> float:
    """Pass-KV ring of an MLA layer: blocks of latents (``kv_lora_rank + qk_rope_head_dim`` per token, one message:
    key and value are the latent), the same on every TP rank, ``(P - 1) / P * N * W * b``."""
    return (sp_size - 1) / sp_size * n_tokens * latent_width * dtype_bytes


def ulysses_bytes_per_layer(
    n_tokens: int, q_heads: int, kv_heads: int, head_dim: int, sp_size: int, ulysses_degree: int,
    dtype_bytes: int = 2,
) -> float:
    """Ulysses over U ranks x ring over R = P / U groups (``ulysses_degree = 1`` is the plain ring).

    All-to-all: of its N / P rows a rank keeps 1 / U and sends the rest, for q (Hq heads), k and v
    (``max(Hk, U)`` heads: KV heads fewer than U are replicated) and, on the way back, o (Hq heads):
    ``(U - 1) / U * N / P * (2 Hq + 2 max(Hk, U)) * D * b``. Ring across the R groups: blocks of N / R tokens of the
    rank's ``max(Hk / U, 1)`` KV heads, :func:`ring_bytes_per_layer` with those. With U = P (no ring) this is
    ``(Hq + max(Hk, P)) / (P * Hk)`` times the ring's bytes: less than the ring when ``P > 1 + Hq / Hk`` (Hk >= P).
    """
    u = ulysses_degree
    if sp_size % u or q_heads % u:
        raise ValueError(f"ulysses_degree={u} must divide sp_size={sp_size} and q_heads={q_heads}")
    all_to_all = (u - 1) / u * n_tokens / sp_size * (2 * q_heads + 2 * max(kv_heads, u)) * head_dim * dtype_bytes
    ring = ring_bytes_per_layer(n_tokens, max(kv_heads // u, 1), head_dim, sp_size // u, dtype_bytes)
    return all_to_all + ring
