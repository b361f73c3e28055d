"""bench_decode.py and bench_prefill.py with FP8 weights and an FP8 KV cache beside the model dtype, end to end on
CPU at a tiny shape (a smoke run: no timing assertions; the KV capacity is counted, not timed)."""

from __future__ import annotations

import pytest

from tests.benchmarks.bench_testing import run_bench, tiny_model


@pytest.mark.slow
def test_bench_decode_and_prefill_take_quantization_and_kv_cache_dtype(tmp_path):
    model = tiny_model(tmp_path, "llama3-8b")
    formats = ["--quantization", "none", "fp8", "--kv-cache-dtype", "auto", "fp8_e4m3"]
    rows = run_bench("bench_decode.py", "--model", model, "--context", 40, "--batch", 1, "--sp-size", 1,
                     "--graphs", "off", "--decode-steps", 4, *formats, out=tmp_path / "d.json", cpu_only=True)
    by_format = {(r["quantization"], r["kv_cache_dtype"]): r for r in rows}
    assert set(by_format) == {(q, kv) for q in ("none", "fp8") for kv in ("auto", "fp8_e4m3")}
    assert all(r["itl_ms"] > 0 for r in rows)
    # FP8 pages hold 4x the tokens of the CPU's fp32 pages in the same budget
    assert by_format["none", "fp8_e4m3"]["kv_tokens"] >= 3.9 * by_format["none", "auto"]["kv_tokens"]
    rows = run_bench("bench_prefill.py", "--model", model, "--context", 100, "--sp-size", 1, "--device", "cpu",
                     "--repeat", 1, *formats, out=tmp_path / "p.json")
    assert {(r["quantization"], r["kv_cache_dtype"]) for r in rows if r["ttft_s"] > 0} == set(by_format)
