"""Shared pieces of the benchmark smoke tests: a model directory at a shrunk real shape, and one benchmark run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.model_shapes import SHAPES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# CPU size; the architecture, its layer kinds and the rest of the shape's config are kept
TINY = dict(hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=300, num_hidden_layers=2)


def tiny_model(tmp_path: Path, shape: str, **over) -> Path:
    """A directory holding only config.json: ``SHAPES[shape]`` shrunk by ``TINY``, then ``over``."""
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**SHAPES[shape], **TINY, **over}))
    return model


def run_bench(script: str, *args, out: Path, timeout: int = 300, cpu_only: bool = False,
              output: list[str] | None = None) -> list[dict]:
    """Run ``benchmarks/<script>`` with ``args`` and ``--out out``; the rows it wrote (its stdout and stderr are
    appended to ``output`` if given)."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", script), *map(str, args), "--out", str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if cpu_only else None
    r = subprocess.run(cmd, check=True, timeout=timeout, cwd=ROOT, env=env, capture_output=output is not None,
                       text=True)
    if output is not None:
        output += [r.stdout, r.stderr]
    return json.loads(out.read_text())["rows"]
