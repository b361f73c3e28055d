"""Dense weights sharded over the SP group (``shard_dense_weights``; real spawned workers on gloo) against
transformers.

A dense Llama and a Qwen3-MoE (one dense layer, 6 experts, with expert parallelism) at sp x tp 2 x 1 and 2 x 2 must
give transformers' fp32 greedy tokens for a prompt split over SP (chunked prefill at 50: its 4-token tail chunk is
replicated on every SP rank), two short prompts homed on one SP rank each, and decode steps in the CUDA-graph form
(run eagerly; the dense model's steps of the split prompt alone on the stored rows, without gathering the layers)
and, with three requests over the largest graph batch, in the eager form. Every rank stores its 1/sp of the dense
weights: at 2 x 2 its weight bytes are at most 1.15 x a quarter of the checkpoint's.
"""

from __future__ import annotations

import pytest
from safetensors import safe_open

from server import LLM, SamplingParams
from tests.helpers import hf_greedy, hf_model, prompt, save_tiny_model

pytestmark = pytest.mark.slow

PROMPTS = [prompt(54), prompt(5, seed=2), prompt(3, seed=4)]
TOKENS = 6
GREEDY = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
ENGINE = dict(device="cpu", sp_min_tokens=8, chunked_prefill_size=50, page_size=8, cuda_graph="eager",
              cuda_graph_max_bs=2, shard_dense_weights=True)
MODELS = {"llama": {}, "qwen3_moe": dict(enable_expert_parallel=True)}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Per architecture: (checkpoint, transformers' greedy tokens of PROMPTS, the checkpoint's bytes)."""
    root = str(tmp_path_factory.mktemp("ckpt"))
    out = {}
    for arch in MODELS:
        path = save_tiny_model(arch, root)
        model = hf_model(path)
        with safe_open(f"{path}/model.safetensors", framework="pt") as f:
            total = sum(f.get_tensor(k).nbytes for k in f.keys())
        out[arch] = (path, [hf_greedy(model, ids, TOKENS) for ids in PROMPTS], total)
    return out


@pytest.mark.parametrize("arch,sp,tp", [(a, sp, tp) for a in MODELS for sp, tp in ((2, 1), (2, 2))])
def test_sharded_dense_weights_match_transformers(references, arch, sp, tp):
    path, tokens, total = references[arch]
    with LLM(path, sp_size=sp, tp_size=tp, **ENGINE, **MODELS[arch]) as llm:
        # two requests: decode steps in the graph form; three: over the largest graph batch, eager decode steps
        assert [o.token_ids for o in llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)] == tokens[:2]
        assert llm.engine.runner.graphs.steps > 0
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == tokens
        # the split prompt alone: its decode rows are on every SP rank, so a dense model decodes on the stored rows
        assert llm.generate([PROMPTS[0]], GREEDY, use_tqdm=False)[0].token_ids == tokens[0]
        assert (llm.engine.runner.graphs.split_steps > 0) == (arch == "llama")
        ranks = llm.engine.memory_stats(reset=False)
    assert len(ranks) == sp * tp and all(m["gather_buffer_bytes"] > 0 for m in ranks)
    weights = [m["weight_bytes"] for m in ranks]
    assert all(0 < b <= 1.15 * total / (sp * tp) for b in weights), (weights, total)
    assert sum(weights) < 1.1 * total  # nothing is stored twice but the norms and biases
