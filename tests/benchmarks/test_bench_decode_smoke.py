"""bench_decode.py end to end on CPU at a tiny shape (a smoke run: no timing assertions)."""

from __future__ import annotations

import pytest

from tests.helpers import run_bench, tiny_model


@pytest.mark.slow
def test_bench_decode_runs_on_cpu(tmp_path):
    model = tiny_model(tmp_path, "llama3-8b", intermediate_size=96)
    png = tmp_path / "d.png"
    rows = run_bench("bench_decode.py", "--model", model, "--context", 40, 100, "--batch", 1, 3, "--sp-size", 1, 2,
                     "--graphs", "off", "--decode-steps", 4, "--plot", png, out=tmp_path / "d.json", cpu_only=True)
    assert {(r["sp"], r["context"], r["batch"]) for r in rows} == {
        (sp, c, b) for sp in (1, 2) for c in (40, 100) for b in (1, 3)}
    assert all(r["itl_ms"] > 0 and r["itl_p50_ms"] <= r["itl_p99_ms"] for r in rows)
    assert {"model", "sp", "tp", "context", "batch", "itl_ms", "floor_ms"} <= set(rows[0])
    assert png.stat().st_size > 0


@pytest.mark.slow
def test_bench_decode_structured_runs_on_cpu(tmp_path):
    """--structured json: each cell unconstrained and JSON-constrained (a synthetic tokenizer: the shape has none)."""
    model = tiny_model(tmp_path, "llama3-8b", intermediate_size=96, vocab_size=1024)
    rows = run_bench("bench_decode.py", "--model", model, "--context", 40, "--batch", 3, "--sp-size", 1,
                     "--graphs", "off", "--decode-steps", 4, "--structured", "json", out=tmp_path / "d.json",
                     cpu_only=True)
    assert [r["structured"] for r in rows] == ["none", "json"]
    assert all(r["itl_ms"] > 0 for r in rows)


@pytest.mark.slow
def test_bench_decode_structured_after_a_long_prefill_on_cpu(tmp_path):
    """32 prompts of 2048 tokens take 9 steps of the 8192-token budget to prefill: the requests whose prompt was
    done first decode meanwhile, and the context length the benchmark sets leaves them room for every timed step
    (before, they ended at their length limit and the step after was short of their tokens)."""
    model = tiny_model(tmp_path, "llama3-8b", intermediate_size=96, vocab_size=1024)
    rows = run_bench("bench_decode.py", "--model", model, "--context", 2048, "--batch", 32, "--sp-size", 1,
                     "--graphs", "off", "--decode-steps", 4, "--structured", "json", out=tmp_path / "d.json",
                     cpu_only=True)
    assert [r.get("skipped") for r in rows] == [None, None]
    assert [r["structured"] for r in rows] == ["none", "json"] and all(r["itl_ms"] > 0 for r in rows)


@pytest.mark.slow
def test_bench_decode_expert_parallel_flag_on_cpu(tmp_path):
    """The Qwen3-30B-A3B shape, shrunk, with and without the expert-parallel path at one rank."""
    model = tiny_model(tmp_path, "qwen3-30b-a3b", num_experts=5, num_experts_per_tok=2, moe_intermediate_size=32)
    rows = run_bench("bench_decode.py", "--model", model, "--context", 40, "--batch", 2, "--sp-size", 1,
                     "--graphs", "off", "--decode-steps", 3, "--enable-expert-parallel", "off", "on",
                     out=tmp_path / "d.json", cpu_only=True)
    assert sorted(r["expert_parallel"] for r in rows) == [False, True]
    assert all(r["itl_ms"] > 0 for r in rows)


@pytest.mark.slow
def test_bench_decode_sharded_dense_weights_on_cpu(tmp_path):
    """--shard-dense-weights on off at sp = 2: both configs decode, and the memory floor counts the weights whole
    (a gathered step reads them whole)."""
    model = tiny_model(tmp_path, "llama3-8b", intermediate_size=96)
    rows = run_bench("bench_decode.py", "--model", model, "--context", 40, "--batch", 1, "--sp-size", 2,
                     "--graphs", "off", "--decode-steps", 4, "--shard-dense-weights", "off", "on",
                     out=tmp_path / "d.json", cpu_only=True)
    assert sorted(r["shard_dense_weights"] for r in rows) == [False, True]
    assert all(r["itl_ms"] > 0 for r in rows) and rows[0]["floor_ms"] == rows[1]["floor_ms"]
