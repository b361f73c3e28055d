"""The FP8 Triton kernels compile for Hopper (sm_90) at every tile configuration their wrappers launch.

The CPU tests run these kernels under ``TRITON_INTERPRET=1``, which multiplies in fp32 and checks none of the
target's rules (FP8 dots need K tiles >= 32, ``float8e4nv`` needs sm_89+, shared memory per block). Triton compiles
ahead of time for a named target without a GPU (its bundled ``ptxas``), so these checks run on CPU, in one child
process without the interpreter (which replaces Triton's language functions in the process that enables it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HOPPER_SHARED_BYTES = 232448  # the most dynamic shared memory one block may use on an H100


def _ints(*names: str) -> dict[str, str]:
    return {name: "i32" for name in names}


_BLOCK_GEMM = {"A": "*u8", "A_SCALE": "*fp32", "B": "*u8", "B_SCALE": "*fp32", "C": "*bf16",
               **_ints("M", "N", "K", "KB", "s_am", "s_bn", "s_cm")}
_QUANTIZE = {"X": "*bf16", "Q": "*u8", "S": "*fp32", **_ints("K", "G", "KB", "s_xm", "s_qm")}
_EXPERTS = {"W": "*u8", "S": "*fp32", "OUT": "*fp32",
            **_ints("M", "N", "K", "G", "G_PER", "BK_SCALE", "s_xm", "s_wg", "s_wn", "s_sg", "s_sn", "s_op", "s_om")}
_GATHERED = {"X": "*bf16", "W": "*u8", "S": "*fp32", "INDEX": "*i64", "OUT": "*fp32",
             **_ints("N", "K", "BK_SCALE", "s_xm", "s_wg", "s_wn", "s_sg", "s_sn", "s_om")}

_GEMV = {"X": "*bf16", "W": "*u8", "S": "*fp32", "BIAS": "*bf16", "Y": "*bf16",
         **_ints("M", "N", "K", "BK_SCALE", "K_PER_SPLIT", "s_xm", "s_wn", "s_sn", "s_ym", "s_ys")}


def _gemv(block_m: int, block_n: int, block_k: int, per_block: bool, convert: str = "ptx") -> dict:
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "PER_BLOCK": per_block, "HAS_BIAS": True,
            "CONVERT": convert}


# name: (module, kernel, signature, constexprs, compute capability[, options]); the tiles are those the wrappers
# launch (fp8_gemv: its default tiles and the ends of the benchmark's sweep)
CASES = {
    "block_gemm_bk16": ("fp8_gemm", "_block_fp8_matmul_kernel", _BLOCK_GEMM,
                        {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 16, "UPCAST": False}, 90),
    "block_gemm_bk128": ("fp8_gemm", "_block_fp8_matmul_kernel", _BLOCK_GEMM,
                         {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "UPCAST": False}, 90),
    "quantize_groups": ("fp8_gemm", "_quantize_groups_kernel", _QUANTIZE, {"BLOCK": 128}, 90),
    "experts_bf16_bk16": ("fp8_moe", "_experts_matmul_kernel", {"X": "*bf16", **_EXPERTS},
                          {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 16, "PRECISION": "tf32", "UPCAST": False}, 90),
    "experts_bf16_bk64": ("fp8_moe", "_experts_matmul_kernel", {"X": "*bf16", **_EXPERTS},
                          {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "PRECISION": "tf32", "UPCAST": False}, 90),
    "experts_bf16_m16_bk64": ("fp8_moe", "_experts_matmul_kernel", {"X": "*bf16", **_EXPERTS},
                              {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "PRECISION": "tf32", "UPCAST": False}, 90),
    "experts_fp32_bk64": ("fp8_moe", "_experts_matmul_kernel", {"X": "*fp32", **_EXPERTS},
                          {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "PRECISION": "ieee", "UPCAST": False}, 90),
    "gathered_bk16": ("fp8_moe", "_gathered_matmul_kernel", _GATHERED, {"BLOCK_N": 64, "BLOCK_K": 16}, 90),
    "gathered_on_sm80": ("fp8_moe", "_gathered_matmul_kernel", _GATHERED, {"BLOCK_N": 64, "BLOCK_K": 16}, 80),
    "gemv_m16_row": ("fp8_gemv", "_fp8_gemv_kernel", _GEMV, _gemv(16, 32, 256, False), 90,
                     {"num_warps": 4, "num_stages": 4}),
    "gemv_m32_block_split": ("fp8_gemv", "_fp8_gemv_kernel", {**_GEMV, "Y": "*fp32"}, _gemv(32, 64, 128, True),
                             90, {"num_warps": 4, "num_stages": 4}),
    "gemv_m64_wide": ("fp8_gemv", "_fp8_gemv_kernel", _GEMV, _gemv(64, 128, 512, False), 90,
                      {"num_warps": 8, "num_stages": 3}),
    "gemv_triton_convert": ("fp8_gemv", "_fp8_gemv_kernel", _GEMV, _gemv(16, 16, 512, True, "triton"), 90,
                            {"num_warps": 4, "num_stages": 6}),
    "gemv_on_sm80": ("fp8_gemv", "_fp8_gemv_kernel", _GEMV, _gemv(16, 32, 256, False), 80),
}


def compile_cases() -> dict[str, dict]:
    """Each case compiled for its target: ``{"shared": bytes}`` or ``{"error": message}``."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = {}
    for name, (module, kernel, signature, constexprs, capability, *options) in CASES.items():
        fn = getattr(importlib.import_module(f"server.kernels.{module}"), kernel)
        sig = {**signature, **{key: "constexpr" for key in constexprs}}
        try:
            compiled = triton.compile(ASTSource(fn, sig, constexprs=constexprs),
                                      target=GPUTarget("cuda", capability, 32), options=(options or [None])[0])
            results[name] = {"shared": compiled.metadata.shared}
        except Exception as e:  # noqa: BLE001 - the message is the result
            results[name] = {"error": str(e)}
    return results


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = Path(__file__).resolve().parents[2]
    code = "import json; from tests.kernels.test_sm90_compile import compile_cases; print(json.dumps(compile_cases()))"
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env={**env, "PYTHONPATH": str(root)},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case[4] >= 89])
def test_kernel_compiles_for_hopper(compiled, name):
    """Blocks of 16 columns (the finer blocks a TP slice stores, an FP8 dot's K below its minimum of 32) and the
    checkpoints' 128; bf16 and fp32 activations; within an H100's shared memory."""
    assert "error" not in compiled[name], compiled[name]
    assert compiled[name]["shared"] <= HOPPER_SHARED_BYTES


def test_fp8_kernels_do_not_compile_before_sm89(compiled):
    """``float8e4nv`` does not exist before sm_89, which is why the wrappers run the torch references there."""
    assert "fp8e4nv" in compiled["gathered_on_sm80"].get("error", "")


def test_gemv_ptx_conversion_assembles_for_ampere(compiled):
    """The GEMV's e4m3 -> bf16 conversion is integer PTX plus ``fma.rn.bf16x2`` (sm_80): ptxas takes it for sm_80
    too, where Triton's own FP8 type does not exist."""
    assert "error" not in compiled["gemv_on_sm80"], compiled["gemv_on_sm80"]
