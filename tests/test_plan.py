"""The planning command (``python -m server.plan``) against published parameter counts and a saved checkpoint."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from server.plan import load_config, main, plan_from_arithmetic, plan_rank
from tests.helpers import save_fp8_model, save_tiny_model

# Parameter counts the model cards publish (language model only).
PUBLISHED = {"llama3.1-70b": 70_553_706_496, "qwen3-30b-a3b": 30_532_122_624, "qwen3-235b-a22b": 235_093_634_560}
PLANNED = ["minimax-text-01", "qwen3.5-397b-a17b", "qwen3-235b-a22b", "qwen3-coder-480b-a35b", "qwen3-next-80b-a3b",
           "llama3.1-70b"]


@pytest.mark.parametrize("shape", list(PUBLISHED))
def test_weights_match_published_parameter_counts(shape):
    assert plan_rank(load_config(None, shape), 1, 1, False, None).weights == 2 * PUBLISHED[shape]  # bf16


def test_built_model_and_config_arithmetic_agree():
    """Two independent counts of one shape: the model built on meta, and the config arithmetic (which also serves
    families without a model class), at tp = 2, with expert parallelism over 8 ranks, and with the dense weights
    sharded over SP (plus their gather buffers) for a MoE and a dense model."""
    for shape, sp, tp, ep, dense in (("qwen3-30b-a3b", 1, 2, False, False), ("qwen3-30b-a3b", 4, 2, True, False),
                                     ("qwen3-30b-a3b", 4, 2, True, True), ("llama3.1-70b", 4, 2, False, True)):
        cfg = load_config(None, shape)
        built = plan_rank(cfg, sp, tp, ep, None, dense)
        counted = plan_from_arithmetic(cfg, sp, tp, ep, None, dense)
        assert built.kv_per_token == counted.kv_per_token
        assert abs(built.weights - counted.weights) < 1e-5 * built.weights, (shape, sp, tp, ep, dense)


def test_dense_weights_sharded_over_sp():
    """Llama-3.1-70B at sp = 4 x tp = 2: a quarter of the TP slice, plus two layers' and the vocabulary's TP slices
    (the gather buffers), from the published parameter count."""
    cfg = load_config(None, "llama3.1-70b")
    layer = (8192 * (64 + 2 * 8) * 128 + 64 * 128 * 8192 + 3 * 8192 * 28672) // 2  # one layer's TP slice
    vocab = 128256 * 8192 // 2
    norms = 80 * 2 * 8192 + 8192
    params = (PUBLISHED["llama3.1-70b"] - norms) // 8 + norms + 2 * layer + vocab
    assert abs(plan_rank(cfg, 4, 2, False, None, True).weights - 2 * params) < 1e-4 * 2 * params


def test_checkpoint_directory_and_expert_parallel_share(tmp_path):
    """A saved MoE checkpoint: at sp = tp = 1 the planned bf16 weights are half its fp32 tensor bytes. At sp = 2 x
    tp = 2, expert parallelism turns rank 0's half of every expert into 2 of the 5 experts whole, and its half of
    the shared expert into all of it."""
    path = save_tiny_model("qwen3_5_moe", str(tmp_path), num_experts=5, num_experts_per_tok=3)
    with safe_open(f"{path}/model.safetensors", framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = load_config(path, None)
    assert plan_rank(cfg, 1, 1, False, None).weights * 2 == sum(t.nbytes for t in tensors.values())
    experts = sum(t.nbytes for k, t in tensors.items() if ".mlp.experts." in k) // 2  # bf16
    shared = sum(t.nbytes for k, t in tensors.items() if ".mlp.shared_expert." in k) // 2
    tp_sliced = plan_rank(cfg, 2, 2, False, None).weights
    assert plan_rank(cfg, 2, 2, True, None).weights == tp_sliced - experts // 2 + 2 * experts // 5 + shared // 2


def test_fp8_checkpoint_plans_the_bytes_the_engine_loads(tmp_path):
    """An FP8 MoE checkpoint (blocks of 32 x 16): the planned weights are what the loaded engine reports (its linear
    layers and experts FP8 with their scales, the rest bf16), about half the bf16 plan; ``--quantization fp8`` plans
    a high-precision checkpoint the same way, with one scale per row."""
    from server import LLM

    fp8, _ = save_fp8_model("qwen3_moe", str(tmp_path), "block", (32, 16))
    planned = plan_rank(load_config(fp8, None), 1, 1, False, None).weights
    with LLM(fp8, device="cpu", dtype="bfloat16") as llm:
        assert planned == llm.engine.runner.footprint()["weight_bytes"]
    bf16 = load_config(save_tiny_model("qwen3_moe", str(tmp_path)), None)
    assert planned < 0.75 * plan_rank(bf16, 1, 1, False, None).weights
    # one scale per row, not per 16 columns
    assert plan_rank(bf16, 1, 1, False, None, quantization="fp8").weights < planned


def test_cli_table_for_the_large_models(capsys):
    main(["--shape", *PLANNED, "--sp-size", "4", "--tp-size", "2", "--enable-expert-parallel", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["model"] for r in rows] == PLANNED
    by = {r["model"]: r for r in rows}
    # Qwen3-Next: 512 experts of 2048 x 512 x 3 in 48 layers, 64 per rank, bf16
    assert by["qwen3-next-80b-a3b"]["weights_gb"] > 48 * 64 * 3 * 2048 * 512 * 2 / 1e9
    assert by["qwen3-next-80b-a3b"]["fits_80 GB"] and not by["qwen3-coder-480b-a35b"]["fits_80 GB"]
    main(["--shape", "llama3.1-70b", "--tp-size", "2"])
    assert "| llama3.1-70b | 70.6 |" in capsys.readouterr().out
