"""Sequence x tensor parallel engine runs (real spawned workers on gloo) against the single-rank engine.

Every configuration must reproduce the sp=1 x tp=1 prompt logits (fp32 tolerance, see test_parity) and the
exact greedy tokens, for a long prompt split over SP (chunked, so later chunks attend to an SP-sharded prefix
and continue from a LASP state), and for a mixed batch that includes prompts below the SP threshold.
"""

from __future__ import annotations

import pytest

from server import LLM, SamplingParams
from tests.helpers import (
    assert_matches_reference,
    hf_greedy,
    hf_model,
    prompt,
    save_tiny_model,
    single_rank_reference,
    transformers_reference,
)

pytestmark = pytest.mark.slow

LONG = prompt(77)
BATCH = [prompt(77), prompt(5), prompt(40, seed=1), prompt(1, seed=2)]
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
# sp_min_tokens 8 < chunk 50: chunks of LONG are split over SP, the short prompts and decode tokens are not.
ENGINE = dict(device="cpu", sp_min_tokens=8, chunked_prefill_size=50, page_size=8)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return single_rank_reference(str(tmp_path_factory.mktemp("ckpt")), ("llama", "minimax_7to1"), ENGINE, LONG,
                                 BATCH, GREEDY)


def check(reference, arch: str, **kw):
    """Run the checks; returns rank 0's decode graphs (None without them), for their counters."""
    with LLM(reference[arch][0], **{**ENGINE, **kw}) as llm:
        assert_matches_reference(llm, reference[arch], LONG, BATCH, GREEDY)
        tokens = reference[arch][3]
        assert llm.generate([LONG], GREEDY)[0].token_ids == tokens[0]
        # a short request alone: homed on one SP rank while the others run steps with no rows at all
        assert llm.generate([BATCH[1]], GREEDY)[0].token_ids == tokens[1]
        assert llm.engine.stats().kv_pages_used == 0
        return llm.engine.runner.graphs


@pytest.mark.parametrize("arch", ["llama", "minimax_7to1"])
@pytest.mark.parametrize("sp,tp", [(2, 1), (4, 1), (1, 2), (2, 2), (4, 2)])
def test_sp_tp_matches_single_rank(reference, arch, sp, tp):
    check(reference, arch, sp_size=sp, tp_size=tp)


def test_allgather_modes_match(reference):
    """All-gather KV (softmax layers) and LASP-2 (lightning layers) give the same results as the rings."""
    check(reference, "minimax_7to1", sp_size=2, ring_mode="allgather", lasp_mode="allgather")


def test_tp_without_sequence_sharding_matches(reference):
    """Plain TP linears (all-reduce) and the sequence-parallel forms (all-gather / reduce-scatter) agree."""
    check(reference, "minimax_7to1", sp_size=2, tp_size=2, seq_parallel_tp=False)


@pytest.mark.parametrize("arch", ["llama", "minimax_7to1"])
@pytest.mark.parametrize("sp,tp", [(1, 1), (2, 1), (2, 2)])
def test_decode_in_graph_form_matches(reference, arch, sp, tp):
    """Decode steps padded to the CUDA-graph buckets (scratch page and slot for padded rows, KV writes of rows a
    rank does not store sent to the scratch page, the SP merge kept by mask) give the same tokens; run eagerly,
    the form CUDA graphs replay on a GPU. At sp > 1 the long request's decode steps (every row replicated) split
    Llama's MLPs over the SP ranks (MiniMax's MoE layers do not split)."""
    graphs = check(reference, arch, sp_size=sp, tp_size=tp, cuda_graph="eager", cuda_graph_max_bs=4)
    assert graphs.steps > 0
    assert (graphs.split_steps > 0) == (sp > 1 and arch == "llama")
    assert graphs.split_steps < graphs.steps  # the batch's homed requests: steps that do not split


def test_decode_without_the_sp_split_mlp_matches(reference):
    graphs = check(reference, "llama", sp_size=2, cuda_graph="eager", cuda_graph_max_bs=4,
                   sp_split_mlp=False)
    assert graphs.steps > 0 and graphs.split_steps == 0


# ---- gpt-oss: sliding-window layers (window 16) and attention sinks, against transformers ------------------------
DOC = prompt(300, seed=7)
# siblings of DOC, sharing 251 tokens with it: the first one computes its prompt (DOC's entry holds no window-layer
# pages around 251) and keeps the window before 251; the second one's cached prefix ends there, inside a window
OSS_BRANCH = DOC[:251] + prompt(29, seed=8)
OSS_BRANCH2 = DOC[:251] + prompt(23, seed=11)
OSS_BATCH = [DOC, prompt(5, seed=9), prompt(40, seed=10)]
OSS_GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
# chunks of 12 tokens per SP rank: every zigzag piece of a split chunk is shorter than the window, so halos reach
# back over several chunks, ranks and chunked-prefill steps
OSS_ENGINE = dict(device="cpu", sp_min_tokens=8, chunked_prefill_size=12, page_size=8)


@pytest.fixture(scope="module")
def gpt_oss_reference(tmp_path_factory):
    """The tiny gpt-oss checkpoint and transformers' greedy tokens for the batch and the branch prompt."""
    path = save_tiny_model("gpt_oss", str(tmp_path_factory.mktemp("ckpt")))
    ref = hf_model(path)
    return path, [hf_greedy(ref, ids, OSS_GREEDY.max_tokens) for ids in [*OSS_BATCH, OSS_BRANCH, OSS_BRANCH2]]


# 2 x 2: experts spread over the four ranks (5 experts: one rank holds two), graph-form decode exchanges
@pytest.mark.parametrize("sp,tp,graph,ep", [(1, 1, "off", False), (1, 1, "eager", False), (2, 2, "eager", True),
                                            (4, 1, "off", False), (4, 2, "eager", False)])
def test_gpt_oss_matches_transformers(gpt_oss_reference, sp, tp, graph, ep):
    """Greedy tokens of transformers (fp32) for a 300-token prompt split over SP in chunked-prefill steps shorter
    than the window, a mixed batch, and prompts whose prefix-cache hit ends inside a window; decode eager or in
    the CUDA-graph form (padded buckets, sinks after the SP merge)."""
    path, want = gpt_oss_reference
    with LLM(path, sp_size=sp, tp_size=tp, cuda_graph=graph, cuda_graph_max_bs=4, enable_expert_parallel=ep,
             **OSS_ENGINE) as llm:
        assert [o.token_ids for o in llm.generate(OSS_BATCH, OSS_GREEDY, use_tqdm=False)] == want[:3]
        assert llm.generate([OSS_BRANCH], OSS_GREEDY)[0].token_ids == want[3]
        branch = llm.generate([OSS_BRANCH2], OSS_GREEDY)[0]
        assert branch.token_ids == want[4]
        assert branch.cached_tokens == 251  # a hit that ends inside a window (mid-page: copied on write)
        if graph == "eager":
            assert llm.engine.runner.graphs.steps > 0
        assert llm.engine.stats().kv_pages_used == 0
        if ep:
            held = sorted(e for m in llm.engine.memory_stats(reset=False) for e in range(*m["experts"]))
            assert held == list(range(llm.engine.model_cfg.moe.num_experts))  # each expert on one rank


# The MoE families against transformers itself, on every rank: chunked prefill split over SP, a prefix-cache hit
# whose branch point lies inside a cached page and a chunk, decode in the CUDA-graph form (run eagerly) at 4 x 2.
MOE_FAMILIES = ("qwen3_moe", "minimax_m2", "glm4_moe")
BRANCH = LONG[:61] + prompt(9, seed=5)
MOE_GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)  # few tokens: 8 processes on few cores


@pytest.fixture(scope="module")
def moe_references(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("moe"))
    return {arch: transformers_reference(save_tiny_model(arch, root), LONG, BATCH + [BRANCH], MOE_GREEDY.max_tokens)
            for arch in MOE_FAMILIES}


# every family at 2 x 2, 4 x 1 and 4 x 2 (1 x 1: tests/models/test_parity.py); the last three: expert parallelism over
# every rank, 6 experts over 4 ranks (docs/sp.md, "Expert parallelism")
@pytest.mark.parametrize("arch,sp,tp,graph,ep", [(a, 4, 2, "eager", False) for a in MOE_FAMILIES] +
                         [("qwen3_moe", 2, 2, "off", False), ("minimax_m2", 4, 1, "off", False),
                          ("glm4_moe", 4, 1, "off", False), ("qwen3_moe", 4, 1, "eager", True),
                          ("minimax_m2", 2, 2, "off", True), ("glm4_moe", 2, 2, "eager", True)])
def test_moe_families_match_transformers(moe_references, arch, sp, tp, graph, ep):
    path, logits, short_logits, tokens = moe_references[arch]
    with LLM(path, **{**ENGINE, "sp_size": sp, "tp_size": tp, "cuda_graph": graph, "cuda_graph_max_bs": 4,
                      "enable_expert_parallel": ep}) as llm:
        assert_matches_reference(llm, (path, logits, short_logits, tokens[:-1]), LONG, BATCH, MOE_GREEDY)
        hits = llm.engine.stats().prefix_cache_hit_tokens
        assert llm.generate([BRANCH], MOE_GREEDY)[0].token_ids == tokens[-1]
        assert llm.engine.stats().prefix_cache_hit_tokens > hits  # BRANCH reused LONG's cached pages
        if graph == "eager":
            assert llm.engine.runner.graphs.steps > 0
