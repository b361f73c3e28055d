"""Profiling every rank (``LLM.start_profile`` / ``stop_profile``; the HTTP endpoints are tested in
tests/entrypoints/test_parallel_server.py): real worker processes over gloo, the built-in model on CPU."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from server import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
PROMPT = list(range(3, 60))  # long enough to split over the two SP ranks (sp_min_tokens 16)


def test_every_rank_writes_its_trace_and_op_table(tmp_path):
    with LLM(device="cpu", cpu_cache_gb=0.1, sp_size=2, sp_min_tokens=16) as llm:
        [before] = llm.generate([PROMPT], GREEDY, use_tqdm=False)
        with pytest.raises(ValueError, match="no profile is running"):
            llm.stop_profile()
        with pytest.raises(ValueError, match="profiling is off"):
            llm.start_profile()  # no directory given, none configured
        with pytest.raises(ValueError, match="cannot be created"):
            llm.start_profile("/proc/no-such-dir")
        out = llm.start_profile(str(tmp_path / "prof"))
        with pytest.raises(ValueError, match="running already"):
            llm.start_profile(str(tmp_path / "other"))
        [during] = llm.generate([PROMPT[:-1] + [7]], GREEDY, use_tqdm=False)
        ranks = llm.stop_profile()
        assert [r["rank"] for r in ranks] == [0, 1]
        for r in ranks:
            assert "error" not in r, r
            assert os.path.dirname(r["trace"]) == os.path.dirname(r["ops"]) == out
            with gzip.open(r["trace"], "rt") as f:
                names = {e.get("name", "") for e in json.load(f)["traceEvents"]}
            assert "aten::linear" in names  # the rank ran the model's layers inside the profile
            with open(r["ops"]) as f:
                assert f"rank {r['rank']}," in f.readline() and "aten::" in f.read()
            assert r["host_op_ms"] > 0 and r["device_ms"] == 0.0  # no device kernels on CPU
        assert during.token_ids  # the profiled request ended normally
        # the engine goes on as before, and the next profile gets its own files
        [after] = llm.generate([PROMPT], GREEDY, use_tqdm=False)
        assert after.token_ids == before.token_ids
        llm.start_profile(out, record_shapes=True)
        again = llm.stop_profile()
        assert {r["trace"] for r in again}.isdisjoint(r["trace"] for r in ranks)
        assert all(os.path.exists(r["trace"]) for r in again)


def test_a_profile_of_num_steps_stops_by_itself(tmp_path):
    with LLM(device="cpu", cpu_cache_gb=0.1, sp_size=2, sp_min_tokens=16) as llm:
        with pytest.raises(ValueError, match="num_steps"):
            llm.start_profile(str(tmp_path), num_steps=0)
        steps = llm.engine.num_steps
        llm.start_profile(str(tmp_path), num_steps=2)
        [out] = llm.generate([PROMPT], GREEDY, use_tqdm=False)  # a prefill and 3 decode steps at least
        assert len(out.token_ids) == 4 and llm.engine.num_steps >= steps + 4
        assert not llm.engine.profiler.running  # stopped after its 2 steps, files written
        ranks = llm.stop_profile()  # its summaries, once
        assert [r["rank"] for r in ranks] == [0, 1] and all(os.path.exists(r["trace"]) for r in ranks)
        with pytest.raises(ValueError, match="no profile is running"):
            llm.stop_profile()
