"""The benchmark shapes of the MoE families build (meta device) with the parameter counts their publishers state,
and bench_decode runs one of them shrunk (its memory floor counts only the experts a step must read)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.model_shapes import shape_dir
from server.models.loader import MODEL_CLASSES, read_model_config
from server.sp.groups import ParallelState
from tests.benchmarks.bench_testing import run_bench, tiny_model

# total parameters as published (model cards), without the multi-token-prediction layers the engine does not load
PUBLISHED = {"qwen3-30b-a3b": 30.5e9, "qwen3-coder-480b-a35b": 480e9, "minimax-m2": 230e9, "glm-4.6": 355e9}


@pytest.mark.parametrize("shape", sorted(PUBLISHED))
def test_shape_has_the_published_parameter_count(shape):
    cfg = read_model_config(shape_dir(shape))
    with torch.device("meta"):
        model = MODEL_CLASSES[cfg.architecture](cfg, ParallelState(device=torch.device("meta")), torch.bfloat16)
    total = sum(p.numel() for p in model.parameters())
    assert abs(total / PUBLISHED[shape] - 1) < 0.02, f"{shape}: {total / 1e9:.1f}B parameters"


@pytest.mark.slow
def test_bench_decode_runs_a_moe_shape_on_cpu(tmp_path):
    model = tiny_model(tmp_path, "qwen3-30b-a3b", num_experts=6, num_experts_per_tok=2,
                       moe_intermediate_size=32)
    rows = run_bench("bench_decode.py", "--model", model, "--context", 40, "--batch", 1, 4, "--sp-size", 1,
                     "--graphs", "off", "--decode-steps", 3, out=tmp_path / "d.json", cpu_only=True)
    assert [r["batch"] for r in rows] == [1, 4] and all(r["itl_ms"] > 0 for r in rows)
    # batch 1 reads 2 of 6 experts per layer at most, batch 4 more of them: a larger floor per step
    if rows[0]["floor_ms"] is not None:
        assert rows[0]["floor_ms"] < rows[1]["floor_ms"]
