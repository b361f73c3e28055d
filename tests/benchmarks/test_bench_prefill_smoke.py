"""bench_prefill.py end to end on CPU at a tiny shape (a smoke run: no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.model_shapes import SHAPES
from server.sp.comm_volume import ring_bytes_per_layer, ulysses_bytes_per_layer
from tests.helpers import ROOT, run_bench, tiny_model


@pytest.mark.slow
def test_bench_prefill_runs_on_cpu(tmp_path):
    model = tiny_model(tmp_path, "minimax-hybrid", layer_types=["linear_attention", "full_attention"])
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    output: list[str] = []
    rows = run_bench("bench_prefill.py", "--model", model, "--context", 200, 500, "--sp-size", 1, 2, "--device",
                     "cpu", "--sp-min-tokens", 64, "--repeat", 1, "--shard-dense-weights", "off", "on", "--plot", png,
                     out=out, output=output)
    assert sorted((r["sp"], r["context"], r["shard_dense_weights"]) for r in rows) == [
        (1, 200, "off"), (1, 500, "off"), (2, 200, "off"), (2, 200, "on"), (2, 500, "off"), (2, 500, "on")]
    # dense weights sharded over sp = 2 (the experts are not): each rank stores less, and gathers into buffers
    weights = {(r["sp"], r["shard_dense_weights"]): r["weight_bytes_per_gpu"] for r in rows}
    gathered = {(r["sp"], r["shard_dense_weights"]): r["gather_buffer_bytes_per_gpu"] for r in rows}
    assert weights[2, "on"] < weights[2, "off"] and weights[2, "off"] == weights[1, "off"]
    assert gathered[2, "on"] > 0 and gathered[2, "off"] == gathered[1, "off"] == 0
    # CPU timings are not meaningful: said before and after the table, which shows no speedup or efficiency
    stdout, stderr = output
    assert stderr.count("WARNING: --device cpu: these timings are NOT meaningful") == 2
    table = stdout[stdout.index("TTFT s"):].splitlines()[1:]
    assert len(table) == 6 and all(line.split()[-5:-3] == ["-", "-"] for line in table), table
    assert all(r["ttft_s"] > 0 and r["speedup"] > 0 for r in rows)
    assert png.stat().st_size > 0
    # --merge combines result files without running anything
    merged = tmp_path / "m.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_prefill.py"), "--merge", str(out),
                    "--out", str(merged)], check=True, timeout=120, cwd=ROOT)
    assert json.loads(merged.read_text())["rows"] == rows


def test_bench_prefill_many_short_prompts_on_cpu(tmp_path):
    """``--num-prompts``: prompts below --sp-min-tokens are placed whole on one SP rank; all of them finish."""
    model = tiny_model(tmp_path, "llama3-8b")
    rows = run_bench("bench_prefill.py", "--model", model, "--context", 40, "--num-prompts", 5, "--sp-size", 1, 2,
                     "--device", "cpu", "--sp-min-tokens", 64, "--repeat", 1, out=tmp_path / "r.json")
    assert [(r["sp"], r["num_prompts"], r["placement"]) for r in rows] == [(1, 5, "local"), (2, 5, "home")]
    assert all(r["tokens_per_s"] > 0 and "error" not in r for r in rows)


@pytest.mark.slow
def test_bench_prefill_gdn_shape_on_cpu(tmp_path):
    """A Gated DeltaNet hybrid shape runs with dummy weights (shrunk to CPU size, its layer kinds and MoE kept)."""
    shape = "qwen3-next-like"
    model = tiny_model(tmp_path, shape, num_hidden_layers=4, linear_num_key_heads=2, linear_num_value_heads=4,
                       linear_key_head_dim=8, linear_value_head_dim=8, layer_types=SHAPES[shape]["layer_types"][:4],
                       num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=16)
    rows = run_bench("bench_prefill.py", "--model", model, "--context", 300, "--sp-size", 1, 2, "--device", "cpu",
                     "--sp-min-tokens", 64, "--repeat", 1, out=tmp_path / "r.json")
    assert [(r["sp"], r["placement"]) for r in rows] == [(1, "local"), (2, "split")]
    assert all(r["ttft_s"] > 0 and "error" not in r for r in rows)


@pytest.mark.slow
def test_bench_prefill_ulysses_degree_on_cpu(tmp_path):
    """``--ulysses-degree``: every degree that divides the SP size runs; rows name the SP method and the bytes per
    softmax layer from comm_volume (fp32 on CPU)."""
    model = tiny_model(tmp_path, "llama3-8b")
    rows = run_bench("bench_prefill.py", "--model", model, "--context", 200, "--sp-size", 1, 2, "--ulysses-degree",
                     1, 2, "--device", "cpu", "--sp-min-tokens", 64, "--repeat", 1, out=tmp_path / "r.json")
    assert [(r["sp"], r["ulysses_degree"], r["sp_method"]) for r in rows] == [
        (1, 1, "local"), (2, 1, "ring"), (2, 2, "ulysses")]
    assert all(r["ttft_s"] > 0 and "error" not in r for r in rows)
    assert [r["softmax_bytes_per_layer"] for r in rows] == [
        0.0, ring_bytes_per_layer(200, 2, 16, 2, 4), ulysses_bytes_per_layer(200, 4, 2, 16, 2, 2, 4)]


@pytest.mark.slow
def test_bench_prefill_ulysses_for_linear_layers_only(tmp_path):
    """``--ulysses-layers linear``: the softmax layers stay on the ring (their method and bytes are the ring's)."""
    model = tiny_model(tmp_path, "llama3-8b")
    rows = run_bench("bench_prefill.py", "--model", model, "--context", 200, "--sp-size", 2, "--ulysses-degree", 2,
                     "--ulysses-layers", "linear", "--device", "cpu", "--sp-min-tokens", 64, "--repeat", 1,
                     out=tmp_path / "r.json")
    assert [(r["ulysses_degree"], r["ulysses_layers"], r["sp_method"]) for r in rows] == [(2, "linear", "ring")]
    assert rows[0]["softmax_bytes_per_layer"] == ring_bytes_per_layer(200, 2, 16, 2, 4) and rows[0]["ttft_s"] > 0
