"""MXFP4 expert weights (gpt-oss checkpoints): the dequantization against a scalar decoding of the format written
from its description (OCP Microscaling: E2M1 elements, low nibble first, E8M0 block scales), and a tiny gpt-oss
checkpoint stored as ``*_blocks`` / ``*_scales`` against transformers running the same weights dense (fp32)."""

from __future__ import annotations

import glob
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from server import LLM
from server.models.mxfp4 import dequantize_mxfp4
from tests.helpers import assert_logits_close, hf_model, prompt, save_tiny_model


def decode_scalar(byte_blocks: list[list[int]], scale: int) -> list[float]:
    """One block of 16 bytes -> 32 floats, element by element: sign bit 3, exponent bits 2-1 (bias 1, 0 =
    subnormal), mantissa bit 0; times 2^(scale - 127)."""
    out = []
    for byte in byte_blocks:
        for nibble in (byte & 0xF, byte >> 4):
            sign = -1.0 if nibble & 0b1000 else 1.0
            exp, man = (nibble >> 1) & 0b11, nibble & 1
            mag = man * 0.5 if exp == 0 else 2.0 ** (exp - 1) * (1 + man * 0.5)
            out.append(sign * mag * 2.0 ** (scale - 127))
    return out


def random_mxfp4(*shape: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks ``[*shape, 16]`` and scales ``shape`` (around 2^-3, so products stay near 1)."""
    blocks = torch.randint(0, 256, (*shape, 16), generator=g, dtype=torch.int32).to(torch.uint8)
    scales = torch.randint(121, 127, shape, generator=g, dtype=torch.int32).to(torch.uint8)
    return blocks, scales


def test_dequantize_matches_scalar_decoding():
    g = torch.Generator().manual_seed(0)
    blocks, scales = random_mxfp4(3, 2, 4, g=g)
    scales[0, 0, 0] = 0  # extreme exponents: 2^-127 (fp32 subnormal) and 2^127
    scales[0, 0, 1] = 254
    got = dequantize_mxfp4(blocks, scales, torch.float32)
    assert got.shape == (3, 2, 128)
    want = torch.tensor([[sum((decode_scalar(blocks[i, j, b].tolist(), int(scales[i, j, b])) for b in range(4)), [])
                          for j in range(2)] for i in range(3)], dtype=torch.float32)
    assert torch.equal(got, want)
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.bfloat16), want.bfloat16())


def test_mxfp4_checkpoint_matches_transformers_dense(tmp_path):
    """Expert weights drawn as MXFP4 codes: transformers gets them dense (its layout, ``[E, in, out]``), we load
    the blocks and scales (``[E, out, in / 32, 16]``) of the same values."""
    dense_dir = save_tiny_model("gpt_oss", str(tmp_path / "dense"), intermediate_size=64)  # 64, 64: multiples of 32
    g = torch.Generator().manual_seed(1)
    tensors = load_file(glob.glob(os.path.join(dense_dir, "*.safetensors"))[0])
    quant = {}
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        e, n_in, n_out = tensors[name].shape
        blocks, scales = random_mxfp4(e, n_out, n_in // 32, g=g)
        tensors[name] = dequantize_mxfp4(blocks, scales, torch.float32).transpose(1, 2).contiguous()
        quant[name + "_blocks"], quant[name + "_scales"] = blocks, scales
    ckpt = glob.glob(os.path.join(dense_dir, "*.safetensors"))[0]
    save_file(tensors, ckpt, metadata={"format": "pt"})
    mx_dir = str(tmp_path / "mxfp4")
    shutil.copytree(dense_dir, mx_dir)
    mx = {n: t for n, t in tensors.items() if not n.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    save_file({**mx, **quant}, os.path.join(mx_dir, os.path.basename(ckpt)), metadata={"format": "pt"})

    ids = prompt(40)
    with torch.no_grad():
        want = hf_model(dense_dir)(torch.tensor([ids])).logits[0]
    with LLM(mx_dir, device="cpu") as llm:
        assert_logits_close(llm.engine.prompt_logits(ids), want)
