"""bench_agent.py end to end on CPU at a tiny shape (a smoke run: no timing assertions)."""

from __future__ import annotations

import pytest

from tests.benchmarks.bench_testing import run_bench, tiny_model


@pytest.mark.slow
def test_bench_agent_runs_on_cpu(tmp_path):
    model = tiny_model(tmp_path, "llama3-8b", intermediate_size=96, max_position_embeddings=1024)
    rows = run_bench("bench_agent.py", "--model", model, "--sessions", 2, "--initial-len", 64, "--tool-min", 20,
                     "--tool-max", 60, "--output-len", 4, "--max-context", 300, "--off-turns", 2, "--device", "cpu",
                     "--cpu-cache-gb", 0.1, out=tmp_path / "a.json", cpu_only=True)
    turns = [r for r in rows if "turn" in r]
    on = [r for r in turns if r["cache"]]
    assert {r["session"] for r in on} == {0, 1} and len(on) >= 4
    assert all(r["output_tokens"] == 4 and r["ttft_s"] > 0 for r in turns)
    # later turns of a session reuse the conversation so far: their new tokens are the tool result and the answer
    later = [r for r in on if r["turn"] > 0]
    assert later and all(r["cached_tokens"] > 0 and r["new_tokens"] <= 60 + 4 + 16 for r in later)
    assert len([r for r in turns if not r["cache"]]) == 2
    assert [r for r in rows if r.get("summary") == "trace"][0]["output_tokens_per_s"] > 0
