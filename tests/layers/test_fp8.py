"""FP8 checkpoint formats: the schemes read from ``quantization_config``, and a quantized tensor sliced per shard
(dequantized slices equal the slices of the dequantized tensor; FP8 slices carry their scales, and a cut scale
block is refused naming ``--tp-size``)."""

from __future__ import annotations

import pytest
import torch

from server.kernels.fp8 import dequantize
from server.layers.fp8 import Fp8Scheme, Fp8Weight, checkpoint_scale, parse_fp8_scheme
from tests.helpers import fp8_dequantize_blocks, fp8_quantize_blocks


def ct_config(strategy: str, dynamic: bool = True, **weights) -> dict:
    return {"quant_method": "compressed-tensors", "config_groups": {"g": {
        "weights": {"num_bits": 8, "type": "float", "strategy": strategy, **weights},
        "input_activations": {"num_bits": 8, "type": "float", "dynamic": dynamic}}}}


def test_schemes_from_quantization_config():
    block = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    assert parse_fp8_scheme(block, None) == Fp8Scheme(block=(128, 128))
    assert parse_fp8_scheme(ct_config("channel"), None) == Fp8Scheme()
    assert parse_fp8_scheme(ct_config("tensor", dynamic=False), None) == \
        Fp8Scheme(static_activations=True)
    assert parse_fp8_scheme(ct_config("block", block_structure=[64, 64]), "fp8") == \
        Fp8Scheme(block=(64, 64))
    assert parse_fp8_scheme(None, None) is None
    assert parse_fp8_scheme(None, "fp8") == Fp8Scheme(online=True)


@pytest.mark.parametrize("qc,words", [
    ({"quant_method": "awq"}, "'awq' is not supported"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}}},
     "not FP8"),
    (ct_config("group"), "strategy 'group'"),
])
def test_unsupported_quantization_is_a_clear_error(qc, words):
    with pytest.raises(ValueError, match=words):
        parse_fp8_scheme(qc, None)


def block_weight(n=70, k=80, bn=32, bk=32):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    q, grid = fp8_quantize_blocks(w, bn, bk)
    return q, grid, fp8_dequantize_blocks(q, grid, bn, bk)


def test_sliced_fp8_weight_is_the_slice_of_the_dequantized_weight():
    """Rows and columns that cut blocks (uneven last blocks of 70 x 80 in 32 x 32) dequantize exactly."""
    q, grid, full = block_weight()
    w = Fp8Weight(q, checkpoint_scale(q.shape, grid, (32, 32), "w"), q.shape, 32, "w")
    for key in (slice(None), slice(3, 41), (slice(None), slice(10, 50)), (slice(60, 70), slice(64, 80)), 5):
        assert torch.equal(w[key], full[key])
    fused = torch.stack([q, q])  # a fused [E, N, K] expert tensor, indexed by expert
    ew = Fp8Weight(fused, checkpoint_scale(fused.shape, torch.stack([grid, grid]), (32, 32), "e"), fused.shape, 32,
                   "e")
    assert torch.equal(ew[1], full) and torch.equal(ew[0, 2:9], full[2:9])


def test_raw_fp8_slices_carry_their_scales_and_refuse_cut_blocks():
    q, grid, full = block_weight()
    w = Fp8Weight(q, checkpoint_scale(q.shape, grid, (32, 32), "w"), q.shape, 32, "layers.0.o_proj.weight")
    rows, scale = w.raw(slice(13, 50))  # any rows: scales are per row
    assert torch.equal(dequantize(rows, scale, 32), full[13:50])
    cols, scale = w.raw((slice(None), slice(32, 80)))  # block-aligned columns, ending in the short last block
    assert torch.equal(dequantize(cols, scale, 32), full[:, 32:80])
    with pytest.raises(ValueError, match="o_proj.*cuts the checkpoint's FP8 scale blocks of 32.*--tp-size"):
        w.raw((slice(None), slice(0, 40)))


def test_per_channel_and_per_tensor_scales():
    q, grid, _ = block_weight()
    per_tensor = checkpoint_scale(q.shape, torch.tensor([0.5]), None, "w")
    per_channel = checkpoint_scale(q.shape, torch.arange(70.0).view(70, 1), None, "w")
    assert per_tensor.shape == per_channel.shape == (70, 1)
    assert torch.equal(Fp8Weight(q, per_channel, q.shape, 80, "w")[:, 7:9], q[:, 7:9].float() * per_channel)
    with pytest.raises(ValueError, match="fits neither"):
        checkpoint_scale(q.shape, torch.ones(3), None, "w")
