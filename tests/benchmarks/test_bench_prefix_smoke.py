"""bench_prefix.py end to end on CPU at a tiny shape (a smoke run: no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.model_shapes import SHAPES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_bench_prefix_runs_on_cpu(tmp_path):
    cfg = dict(SHAPES["llama3-8b"], hidden_size=64, intermediate_size=96, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=300, num_hidden_layers=2)
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "p.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_prefix.py"), "--model", str(model),
           "--doc-len", "200", "--question-len", "10", "--questions", "2", "--follow-ups", "1", "--output-len", "4",
           "--sp-size", "1", "--device", "cpu", "--cpu-cache-gb", "0.05", "--out", str(out)]
    subprocess.run(cmd, check=True, timeout=300, cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 4  # cache on and off, 4 turns each
    on = [r for r in rows if r["cache"]]
    assert on[0]["cached_tokens"] == 0 and all(r["cached_tokens"] >= 200 for r in on[1:])  # the document, reused
    assert all(r["cached_tokens"] == 0 for r in rows if not r["cache"])
    assert all(r["ttft_s"] > 0 for r in rows)
