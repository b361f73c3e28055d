"""Triton RMSNorm, SiLU-and-multiply and RoPE vs their torch references (which round as ``transformers`` does).

Without a GPU the kernels run under ``TRITON_INTERPRET=1``. fp16 has exact rounding there, so RoPE (products and
sums rounded once each, as torch rounds them) must match bit for bit; compiled for a GPU, a product and the sum may
become one fused multiply-add, so RoPE is held to a few ulps of its terms (the sum can cancel) there. Elsewhere the
allowance is in units in the last place (ulp) of the output dtype: fp32 a few (the sum of squares in another order,
exp and rsqrt of another library), half precision two (an intermediate rounded to half precision, such as SiLU(gate)
or the normalised row, can land one ulp apart when the fp32 values differ in their last bits; the product with the
other factor carries that ulp and adds its own rounding), and bf16 under the interpreter three (its bf16 conversions
truncate instead of rounding to nearest, once per rounded operation); on a GPU the bf16 checks run again with
round-to-nearest.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined

import pytest  # noqa: E402

from server.kernels.pointwise import rms_norm_triton, rope_triton_, silu_and_mul_triton  # noqa: E402
from server.kernels.pointwise_ref import rms_norm_ref, rope_ref, silu_and_mul_ref  # noqa: E402
from server.layers.rotary import RotaryEmbedding  # noqa: E402
from tests.helpers import DEVICE, needs_cuda  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MANTISSA = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


def allowance(dtype: torch.dtype) -> int:
    if dtype == torch.float32:
        return 4
    return 3 if dtype == torch.bfloat16 and not torch.cuda.is_available() else 2


def assert_within_ulp(got: torch.Tensor, want: torch.Tensor, ulps: int | None = None) -> None:
    """Every element within ``ulps`` (default :func:`allowance`) units in the last place of ``want``."""
    ulps = allowance(want.dtype) if ulps is None else ulps
    assert got.dtype == want.dtype and got.shape == want.shape
    g, w = got.double(), want.double()
    ulp = torch.exp2(torch.floor(torch.log2(w.abs().clamp_min(1e-30))) - MANTISSA[want.dtype])
    bad = (g - w).abs() > ulps * ulp
    assert not bad.any(), f"{int(bad.sum())} elements beyond {ulps} ulp, e.g. {g[bad][:4]} vs {w[bad][:4]}"


def assert_rope_close(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, rot: int, ulps: int = 2) -> None:
    """RoPE's output ``x1 cos - x2 sin`` (and ``x2 cos + x1 sin``) is a sum of two rounded products that can cancel:
    each rotated element within ``ulps`` units in the last place of the larger input of its pair (``|cos|, |sin| <=
    1``, so neither product is larger); the features past ``rot`` pass through unchanged."""
    x = x.reshape(got.shape).float()
    half = rot // 2
    pair = torch.maximum(x[..., :half].abs(), x[..., half:rot].abs())
    term_ulp = torch.exp2(torch.floor(torch.log2(torch.cat([pair, pair], -1).clamp_min(1e-30))) - MANTISSA[got.dtype])
    assert ((got[..., :rot].float() - want[..., :rot].float()).abs() <= ulps * term_ulp).all()
    assert torch.equal(got[..., rot:], want[..., rot:])


def rand(*shape, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("zero_centered", [False, True])
def test_rms_norm_rows_views_and_shapes(dtype, zero_centered):
    w = rand(40, dtype=dtype, seed=1)
    x2 = rand(7, 40, dtype=dtype, scale=3.0)
    # a [T, H, D] view inside a wider row (Qwen3.5's q next to its gate): strides (W, 2D, 1)
    wide = rand(5, 3, 80, dtype=dtype, seed=2)
    x3 = wide[..., :40]
    x4 = rand(2, 3, 4, 40, dtype=dtype, seed=3)  # more leading dims: flattened
    for x in (x2, x3, x4):
        got = rms_norm_triton(x, w, 1e-6, zero_centered)
        assert got.shape == x.shape and got.is_contiguous()
        assert_within_ulp(got, rms_norm_ref(x, w, 1e-6, zero_centered))
    assert rms_norm_triton(x2[:0], w, 1e-6).shape == (0, 40)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    for h in (rand(5, 66, dtype=dtype), rand(2, 3, 66, dtype=dtype, seed=1), rand(6, 80, dtype=dtype, seed=2)[:, :66]):
        assert_within_ulp(silu_and_mul_triton(h), silu_and_mul_ref(h))
    assert silu_and_mul_triton(rand(0, 66, dtype=dtype)).shape == (0, 33)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_rope_in_place_on_a_view(dtype, partial):
    """q and k are views into one qkv row (as the attention blocks split them); the kernel rotates them in place
    and leaves every other element of the buffer alone. Positions reach 10^6 (long contexts)."""
    t, hq, hk, d = 6, 4, 2, 24
    rot = RotaryEmbedding(d, {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": partial}, 4096)
    positions = torch.tensor([0, 1, 17, 4095, 131071, 999_999], device=DEVICE)
    cos, sin = rot.cos_sin(positions, dtype)
    qkv = rand(t, (hq + 2 * hk) * d, dtype=dtype, seed=4)
    before = qkv.clone()
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
    want_q, want_k = rope_ref(q.clone(), cos, sin), rope_ref(k.clone(), cos, sin)
    got_q, got_k = rope_triton_(q, cos, sin), rope_triton_(k, cos, sin)
    if torch.cuda.is_available() or dtype == torch.bfloat16:
        # fused multiply-adds on a GPU, the interpreter's truncating bf16: ulps of the terms, not of the result
        assert_rope_close(got_q, want_q, before[:, : hq * d], cos.shape[-1])
        assert_rope_close(got_k, want_k, before[:, hq * d : (hq + hk) * d], cos.shape[-1])
    else:
        assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert got_q.data_ptr() == q.data_ptr()
    assert torch.equal(qkv[:, (hq + hk) * d :], before[:, (hq + hk) * d :])  # v untouched


def test_rotary_layers_share_one_cos_sin_per_forward():
    """Layers of equal frequencies reuse the first layer's cos/sin from the forward's shared dict, with the
    result of computing their own; another dtype or frequency gets its own entry."""
    a = RotaryEmbedding(16, {"rope_type": "default", "rope_theta": 10000.0}, 4096)
    b = RotaryEmbedding(16, {"rope_type": "default", "rope_theta": 10000.0}, 4096)
    c = RotaryEmbedding(16, {"rope_type": "default", "rope_theta": 500000.0}, 4096)
    pos = torch.tensor([3, 9, 1000], device=DEVICE)
    q, k = rand(3, 2, 16, dtype=torch.float32), rand(3, 1, 16, dtype=torch.float32, seed=1)
    shared: dict = {}
    out_a = a(pos, q.clone(), k.clone(), shared)
    out_b = b(pos, q.clone(), k.clone(), shared)
    assert len(shared) == 1
    for got, want in zip(out_b, b(pos, q.clone(), k.clone()), strict=True):
        assert torch.equal(got, want)
    assert all(torch.equal(x, y) for x, y in zip(out_a, out_b, strict=True))
    c(pos, q.clone(), k.clone(), shared)
    a(pos, q.half().clone(), k.half().clone(), shared)
    assert len(shared) == 3


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pointwise_on_cuda_at_model_shapes(dtype):
    """Llama-3-8B's widths: hidden 4096, 14336 x 2 gate/up, 32 + 8 heads of 128; round-to-nearest on the GPU."""
    x, w = rand(33, 4096, dtype=dtype, scale=4.0), rand(4096, dtype=dtype, seed=1)
    assert_within_ulp(rms_norm_triton(x, w, 1e-5), rms_norm_ref(x, w, 1e-5))
    assert_within_ulp(rms_norm_triton(x, w, 1e-5, True), rms_norm_ref(x, w, 1e-5, True))
    h = rand(33, 2 * 14336, dtype=dtype, seed=2)
    assert_within_ulp(silu_and_mul_triton(h), silu_and_mul_ref(h))
    rot = RotaryEmbedding(128, {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192}, 131072)
    pos = torch.randint(0, 131072, (33,), device=DEVICE)
    cos, sin = rot.cos_sin(pos, dtype)
    q = rand(33, 32, 128, dtype=dtype, seed=3)
    assert_rope_close(rope_triton_(q.clone(), cos, sin), rope_ref(q, cos, sin), q, 128)
