"""Smoke run of ``benchmarks/bench_serving.py`` against a real CPU server (no timing assertions), and its
dependencies in a plain install."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys

import pytest

from server.models.builtin import builtin_model_path
from tests.helpers import REPO


@pytest.fixture(scope="module")
def server(builtin_server):
    return builtin_server  # shared by the modules that need no flags of their own (tests/entrypoints/conftest.py)


@pytest.mark.parametrize("mode", [
    ["--max-concurrency", "4"],
    ["--request-rate", "50", "--prompt-format", "text", "--tokenizer-path", builtin_model_path()],
    ["--max-concurrency", "3", "--text-chunks"],
], ids=["concurrency-ids", "rate-text", "text-chunks"])
def test_bench_serving_smoke(server, tmp_path, mode):
    out = tmp_path / "results.jsonl"
    cmd = [sys.executable, "benchmarks/bench_serving.py", "--base-url", server.url, "--num-prompts", "6",
           "--input-len", "24", "--output-len", "5", "--output-file", str(out), "--disable-tqdm", *mode]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == result
    assert result["completed"] == 6 and result["failed"] == 0, result["errors"]
    assert result["total_output_tokens"] == 6 * 5
    if "--prompt-format" not in mode:  # token-id prompts have exactly --input-len tokens
        assert result["total_input_tokens"] == 6 * 24
    for metric in ("ttft", "tpot", "itl", "e2e_latency"):
        for stat in ("mean", "median", "p99"):
            assert result[f"{stat}_{metric}_ms"] > 0
    assert result["request_throughput"] > 0 and result["output_throughput"] > 0
    if "--text-chunks" not in mode:  # return_token_ids: one chunk per token, whatever its text
        assert result["itl_samples"] == 6 * (5 - 1)
    else:  # chunks with text only (the detokenizer may hold a token's text back)
        assert 0 < result["itl_samples"] <= 6 * (5 - 1)


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_plain_install_brings_what_bench_serving_imports():
    """docs/server.md recommends bench_serving.py after `pip install -e .`: every third-party module it imports
    must come from a package in pyproject's dependencies (as importlib.metadata maps modules to packages)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = _requirement_names(project["dependencies"])
    tree = ast.parse((REPO / "benchmarks" / "bench_serving.py").read_text())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    third_party = modules - set(sys.stdlib_module_names) - {"server", "benchmarks"}
    assert "httpx" in third_party
    providers = importlib.metadata.packages_distributions()
    for module in third_party:
        assert {p.lower().replace("_", "-") for p in providers[module]} & deps, f"{module} is not a dependency"
    # docs/kernels.md runs tests with -n, which pytest-xdist provides
    assert "pytest-xdist" in _requirement_names(project["optional-dependencies"]["dev"])
