"""bench_decode.py end to end on CPU at a tiny shape (a smoke run: no timing assertions)."""

from __future__ import annotations

import pytest

from tests.benchmarks.bench_testing import run_bench, tiny_model


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
