"""Bytes per layer of the SP attention methods, on shapes worked out by hand (Llama-3-8B: Hq 32, Hk 8, D 128)."""

import pytest

from server.sp.comm_volume import ring_bytes_per_layer, ulysses_bytes_per_layer

N = 1 << 20


def test_ring_sends_all_other_shards_kv() -> None:
    assert ring_bytes_per_layer(N, 8, 128, 8) == 7 / 8 * N * 2 * 8 * 128 * 2 == 3_758_096_384
    assert ring_bytes_per_layer(N, 8, 128, 1) == 0


def test_ulysses_degree_one_is_the_ring() -> None:
    assert ulysses_bytes_per_layer(N, 32, 8, 128, 8, 1) == ring_bytes_per_layer(N, 8, 128, 8)


def test_ulysses_examples() -> None:
    # U = P = 8: 7/8 * N/8 * (64 + 16) * 128 * 2, 5/8 of the ring's bytes
    assert ulysses_bytes_per_layer(N, 32, 8, 128, 8, 8) == 2_348_810_240 == 0.625 * ring_bytes_per_layer(N, 8, 128, 8)
    # U = P = 4: 5/4 of the ring's (P is not above 1 + Hq/Hk = 5)
    assert ulysses_bytes_per_layer(N, 32, 8, 128, 4, 4) == 1.25 * ring_bytes_per_layer(N, 8, 128, 4)
    # U = 2 x R = 4: all-to-all 1/2 * N/8 * 80 * 256 plus a ring of 4 over 4 KV heads, 3/4 * N * 8 * 256
    assert ulysses_bytes_per_layer(N, 32, 8, 128, 8, 2) == 1_342_177_280 + 1_610_612_736
    # Llama-3-70B at tp = 8 (Hq 8, Hk 1 per TP rank): the KV head is replicated on every Ulysses rank, 3x the ring
    assert ulysses_bytes_per_layer(N, 8, 1, 128, 4, 4) == 3 / 4 * N / 4 * (16 + 8) * 256 == 3 * ring_bytes_per_layer(
        N, 1, 128, 4)


def test_degree_must_divide() -> None:
    with pytest.raises(ValueError, match="ulysses_degree=3"):
        ulysses_bytes_per_layer(N, 32, 8, 128, 8, 3)
