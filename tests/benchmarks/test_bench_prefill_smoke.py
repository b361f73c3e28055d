"""bench_prefill.py end to end on CPU at a tiny shape (a smoke run: no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.model_shapes import SHAPES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_bench_prefill_runs_on_cpu(tmp_path):
    cfg = dict(SHAPES["minimax-hybrid"], hidden_size=64, intermediate_size=64, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=300, num_hidden_layers=2,
               layer_types=["linear_attention", "full_attention"])
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(cfg))
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_prefill.py"), "--model", str(model),
           "--context", "200", "500", "--sp-size", "1", "2", "--device", "cpu", "--sp-min-tokens", "64",
           "--repeat", "1", "--out", str(out), "--plot", str(png)]
    subprocess.run(cmd, check=True, timeout=300, cwd=ROOT)
    rows = json.loads(out.read_text())["rows"]
    assert {(r["sp"], r["context"]) for r in rows} == {(1, 200), (1, 500), (2, 200), (2, 500)}
    assert all(r["ttft_s"] > 0 and r["speedup"] > 0 for r in rows)
    assert png.stat().st_size > 0
