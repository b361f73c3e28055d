"""bench_prefix.py end to end on CPU at a tiny shape (a smoke run: no timing assertions)."""

from __future__ import annotations

import os

import pytest

from tests.helpers import run_bench, tiny_model


@pytest.mark.slow
def test_bench_prefix_runs_on_cpu(tmp_path):
    model = tiny_model(tmp_path, "llama3-8b", intermediate_size=96)
    rows = run_bench("bench_prefix.py", "--model", model, "--doc-len", 200, "--question-len", 10, "--questions", 2,
                     "--follow-ups", 1, "--output-len", 4, "--sp-size", 1, "--device", "cpu", "--cpu-cache-gb", 0.05,
                     "--profile", out=tmp_path / "p.json", cpu_only=True)
    [profiled] = [r for r in rows if r["name"] == "profiled question"]
    assert profiled["cached_tokens"] >= 200 and profiled["host_op_ms"][0] > 0  # a sibling: the document cached
    profile_dir = tmp_path / f"p_profile_{os.path.basename(str(model).rstrip('/'))}_sp1"
    assert profiled["profile_dir"] == str(profile_dir)
    [table] = profile_dir.glob("*-rank0.ops.txt")
    assert "Self CPU" in table.read_text()
    rows.remove(profiled)
    assert len(rows) == 2 * 4  # cache on and off, 4 turns each
    on = [r for r in rows if r["cache"]]
    assert on[0]["cached_tokens"] == 0 and all(r["cached_tokens"] >= 200 for r in on[1:])  # the document, reused
    assert all(r["cached_tokens"] == 0 for r in rows if not r["cache"])
    assert all(r["ttft_s"] > 0 for r in rows)


@pytest.mark.slow
def test_bench_prefix_cache_off_alone_after_a_warmup(tmp_path):
    model = tiny_model(tmp_path, "llama3-8b", intermediate_size=96)
    rows = run_bench("bench_prefix.py", "--model", model, "--doc-len", 120, "--question-len", 8, "--questions", 2,
                     "--follow-ups", 0, "--output-len", 3, "--sp-size", 1, "--device", "cpu", "--cpu-cache-gb", 0.05,
                     "--cache", "off", "--off-turns", 2, "--warmup-len", 40, out=tmp_path / "p.json", cpu_only=True)
    assert [(r["cache"], r["turn"]) for r in rows] == [(False, 0), (False, 1)]  # the warm-up is not a row
    assert all(r["cached_tokens"] == 0 and r["prompt_tokens"] == 128 for r in rows)


def test_bench_prefix_host_hits_the_document_from_the_second_question(tmp_path):
    """The host-side benchmark drives the real cache manager: the first question leaves the snapshot at the
    document's end, every later one hits the whole document (hybrid); a softmax model hits from the first."""
    rows = run_bench("bench_prefix_host.py", "--doc-len", 512, "--questions", 3, out=tmp_path / "h.json", cpu_only=True)
    assert [r["cached_tokens"] for r in rows] == [0, 0, 512, 512]
    rows = run_bench("bench_prefix_host.py", "--doc-len", 512, "--questions", 2, "--no-hybrid", "--sp-size", 1,
                     out=tmp_path / "s.json", cpu_only=True)
    assert [r["cached_tokens"] for r in rows] == [0, 512, 512]
