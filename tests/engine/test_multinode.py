"""Two nodes on one machine: node 1 is a real ``launch_server.py --node-rank 1`` process running only its worker
ranks; node 0 is the offline engine. Greedy tokens equal the single-rank engine's, and node 1 exits cleanly when
the engine shuts down."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from server import LLM, SamplingParams
from server.config import EngineConfig
from server.execution.procutil import free_port
from server.execution.worker import node_exit_code
from tests.helpers import prompt, save_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_node_flags_are_validated():
    with pytest.raises(ValueError, match="dist-init-addr"):
        EngineConfig(sp_size=2, nnodes=2).validate()
    with pytest.raises(ValueError, match="must divide"):
        EngineConfig(sp_size=3, nnodes=2, dist_init_addr="tcp://127.0.0.1:1").validate()
    with pytest.raises(ValueError, match="fit in one node"):
        EngineConfig(tp_size=2, nnodes=2, dist_init_addr="tcp://127.0.0.1:1").validate()


def test_a_rank_that_died_fails_the_node():
    """``launch_server.py --node-rank k``'s exit status: a rank killed by a signal (exit code -N) is a failure."""
    assert node_exit_code([0, 0, 0]) == 0
    assert node_exit_code([0, -6, 0]) == 134  # SIGABRT, as a shell reports it
    assert node_exit_code([0, 1, -9]) == 1
    assert node_exit_code([-9, 0]) == 137


@pytest.mark.slow
def test_two_nodes_match_single_rank(tmp_path):
    path = save_tiny_model("minimax_alt", str(tmp_path))
    prompts = [prompt(70), prompt(6, seed=4)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    with LLM(path, device="cpu") as llm:
        ref = [o.token_ids for o in llm.generate(prompts, params)]
    addr = f"tcp://127.0.0.1:{free_port()}"
    common = ["--model-path", path, "--device", "cpu", "--sp-size", "2", "--tp-size", "2", "--nnodes", "2",
              "--dist-init-addr", addr, "--sp-min-tokens", "16"]
    node1 = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch_server.py"), *common, "--node-rank", "1"],
                             cwd=ROOT)
    try:
        with LLM(path, device="cpu", sp_size=2, tp_size=2, nnodes=2, node_rank=0, dist_init_addr=addr,
                 sp_min_tokens=16) as llm:
            assert len(llm.engine.worker_pids()) == 1  # node 0 runs ranks 0 and 1; node 1 runs ranks 2 and 3
            assert [o.token_ids for o in llm.generate(prompts, params)] == ref
        assert node1.wait(timeout=60) == 0
    finally:
        node1.kill()
