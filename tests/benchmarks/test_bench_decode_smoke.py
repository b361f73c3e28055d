"""bench_decode.py end to end on CPU at a tiny shape (a smoke run: no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.model_shapes import SHAPES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_bench_decode_runs_on_cpu(tmp_path):
    cfg = dict(SHAPES["llama3-8b"], hidden_size=64, intermediate_size=96, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=300, num_hidden_layers=2)
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(cfg))
    out, png = tmp_path / "d.json", tmp_path / "d.png"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_decode.py"), "--model", str(model),
           "--context", "40", "100", "--batch", "1", "3", "--sp-size", "1", "2", "--graphs", "off",
           "--decode-steps", "4", "--out", str(out), "--plot", str(png)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run(cmd, check=True, timeout=300, cwd=ROOT, env=env)
    rows = json.loads(out.read_text())["rows"]
    assert {(r["sp"], r["context"], r["batch"]) for r in rows} == {
        (sp, c, b) for sp in (1, 2) for c in (40, 100) for b in (1, 3)}
    assert all(r["itl_ms"] > 0 and r["itl_p50_ms"] <= r["itl_p99_ms"] for r in rows)
    assert {"model", "sp", "tp", "context", "batch", "itl_ms", "floor_ms"} <= set(rows[0])
    assert png.stat().st_size > 0
