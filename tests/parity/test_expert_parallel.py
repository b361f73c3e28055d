"""Expert parallelism over every rank of sp x tp (real spawned workers on gloo) against transformers.

Tiny fp32 MoE checkpoints whose expert counts do not divide the world (5 and 10 experts over 2, 4 and 8 ranks;
top-2 and top-3; Qwen3-Next and Qwen3.5-MoE with a shared expert) must give transformers' greedy tokens for:
a prompt split over SP whose 4-token tail chunk is replicated on every SP rank (chunked prefill at 50), a short
prompt homed on one SP rank, decode steps of both in the CUDA-graph form (fixed-size padded exchange, run eagerly)
and, with three requests over the largest graph batch, in the eager form (exact exchange) with replicated rows;
overlapped steps at sp = 2 x tp = 1. (Qwen3-MoE, MiniMax-M2 and GLM-4.5 run with expert parallelism in
test_sp_tp.py's MoE-family cases.)
Every rank reports its experts: each expert lives on exactly one rank.
"""

from __future__ import annotations

import shutil

import httpx
import pytest
import torch

from server import LLM, SamplingParams
from server.models.builtin import builtin_model_path
from tests.helpers import hf_model, prompt, save_tiny_model, start_server, torch_gdn_reference

pytestmark = pytest.mark.slow

PROMPTS = [prompt(54), prompt(5, seed=2), prompt(3, seed=4)]
TOKENS = 6
GREEDY = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
ENGINE = dict(device="cpu", sp_min_tokens=8, chunked_prefill_size=50, page_size=8, cuda_graph="eager",
              cuda_graph_max_bs=2, enable_expert_parallel=True)
# (tiny architecture, its MoE overrides, number of experts)
MODELS = {
    "minimax_alt": (dict(num_local_experts=5, num_experts_per_tok=2), 5),
    "qwen3_next": (dict(num_experts=10, num_experts_per_tok=3), 10),
    "qwen3_5_moe": (dict(num_experts=5, num_experts_per_tok=3), 5),
}


def hf_greedy(path: str) -> list[list[int]]:
    model = hf_model(path)
    out = []
    with torch_gdn_reference(), torch.no_grad():
        for ids in PROMPTS:
            seq = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
            out.append(seq[0, len(ids):].tolist())
    return out


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt"))
    out = {}
    for arch, (over, _) in MODELS.items():
        path = save_tiny_model(arch, root, **over)
        out[arch] = (path, hf_greedy(path))
    return out


@pytest.mark.parametrize("arch,sp,tp", [(a, sp, tp) for a in MODELS for sp, tp in ((2, 1), (2, 2), (4, 2))])
def test_expert_parallel_matches_transformers(references, arch, sp, tp):
    path, tokens = references[arch]
    # overlapped steps at tp = 1 (the engine turns them off for several CPU ranks by default)
    with LLM(path, sp_size=sp, tp_size=tp, overlap_schedule=tp == 1, **ENGINE) as llm:
        # two requests: decode steps in the graph form; three: over the largest graph batch, eager decode steps
        assert [o.token_ids for o in llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)] == tokens[:2]
        graph_steps = llm.engine.runner.graphs.steps
        assert graph_steps > 0
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == tokens
        assert (llm.engine.num_prev_token_steps > 0) == (tp == 1)  # steps that fed back an in-flight token
        ranks = llm.engine.memory_stats(reset=False)
    held = sorted(e for m in ranks for e in range(*m["experts"]))
    assert held == list(range(MODELS[arch][1]))  # every expert on exactly one rank


def test_expert_parallel_weight_bytes_and_load_in_metrics(tmp_path):
    """A MoE-dominated model at sp = 2 x tp = 2: each rank's weight bytes in /metrics are at most 1.15 x a quarter
    of the checkpoint's (expert blocks are 1/4 each; attention and embeddings 1/tp). The pairs the ranks computed
    add up to every row the request ran (prompt, then each generated token but the last) times top-k times the MoE
    layers: each row went to its experts exactly once over the four ranks."""
    from safetensors import safe_open

    path = save_tiny_model("minimax_alt", str(tmp_path), num_local_experts=16, intermediate_size=512,
                           vocab_size=2048)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{builtin_model_path()}/{name}", f"{path}/{name}")
    with safe_open(f"{path}/model.safetensors", framework="pt") as f:
        total = sum(f.get_tensor(k).nbytes for k in f.keys())
    srv = start_server(["--device", "cpu", "--model-path", path, "--sp-size", "2", "--tp-size", "2",
                        "--enable-expert-parallel", "--cpu-cache-gb", "0.05"], tmp_path / "log")
    try:
        body = {"model": path, "prompt": "The tide tables say", "max_tokens": 5, "temperature": 0}
        usage = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=120).json()["usage"]
        text = httpx.get(f"{srv.url}/metrics", timeout=30).text
    finally:
        assert srv.stop() == 0, srv.log()
    per_rank = {}
    for line in text.splitlines():
        if line.startswith("server_rank_weight_bytes{"):
            per_rank[line.split('rank="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    assert sorted(per_rank) == ["0", "1", "2", "3"]
    assert all(0 < b <= 1.15 * total / 4 for b in per_rank.values()), (per_rank, total)
    pairs = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line.startswith("server_expert_rank_pairs_total{")]
    assert len(pairs) == 4 and all(p > 0 for p in pairs)
    rows = usage["prompt_tokens"] + usage["completion_tokens"] - 1
    assert sum(pairs) == rows * 2 * 4  # top-2, 4 MoE layers
    assert "memory: weights" in srv.log()  # every rank's footprint in the start-up log


def test_every_pair_is_counted_in_eager_and_graph_steps(references, monkeypatch):
    """The load each rank computed, per step: the exact exchange's pair counts (eager steps) and the graph-form
    steps' device counters (all-gathered when the engine asks, here every step). The prefill step counts each prompt
    token's top-k pairs per MoE layer once; a graph step counts every row its ranks dispatch, the padded bucket's
    rows included: at sp = 2 with a bucket of 2 rows holding the split request's replicated row (dispatched by one
    rank) and the homed request's row (on its SP rank; the other rank's second row is padding), 3 rows."""
    from server.engine import engine as engine_module

    monkeypatch.setattr(engine_module, "EXPERT_GRAPH_PAIRS_EVERY", 1)
    path, tokens = references["minimax_alt"]
    with LLM(path, sp_size=2, tp_size=1, overlap_schedule=False, **ENGINE) as llm:
        engine = llm.engine
        eager, graph = [], []
        step = engine.step

        def counted_step():
            out = step()
            eager.append(sum(engine.last_step.expert_pairs))
            graph.append(sum(engine.last_step.expert_graph_pairs))
            return out

        engine.step = counted_step
        assert [o.token_ids for o in llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)] == tokens[:2]
        per_row = engine.runner.moe_layers[0].top_k * len(engine.runner.moe_layers)
        graph_steps = engine.runner.graphs.steps
    assert eager[0] == sum(len(ids) for ids in PROMPTS[:2]) * per_row and sum(eager[1:]) == 0
    assert graph_steps == TOKENS - 1 and graph == [0] + [3 * per_row] * graph_steps
