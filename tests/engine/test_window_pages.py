"""Sliding-window layers give back their pages (docs/sp.md, "Sliding-window layers: memory"): a running request
holds O(window + page) window-layer pages per SP rank while its full layers' pages grow with the context, greedy
tokens stay transformers' (fp32), a prefix-cache hit that ends inside a window is served from the window pages
kept at that branch point, and every page is back in the pool once the requests end and the cache is flushed."""

from __future__ import annotations

import math

import pytest

from server import LLM, SamplingParams
from server.messages import GenerateRequest
from tests.helpers import hf_greedy, hf_model, prompt, save_tiny_model

pytestmark = pytest.mark.slow

WINDOW, PAGE, CHUNK = 16, 8, 12  # the tiny gpt-oss's window; chunks of 12 tokens per SP rank: shorter than it
DOC = prompt(300, seed=7)
SIBLINGS = [DOC[:251] + prompt(29, seed=8), DOC[:251] + prompt(23, seed=11)]  # branch at 251: mid-window, mid-page
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
# decode and short extend steps (sp = 1: every prefill chunk) in the CUDA-graph form, run eagerly
ENGINE = dict(device="cpu", sp_min_tokens=8, chunked_prefill_size=CHUNK, page_size=PAGE, cuda_graph="eager",
              cuda_graph_max_bs=4, cuda_graph_max_extend_tokens=16)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = save_tiny_model("gpt_oss", str(tmp_path_factory.mktemp("ckpt")))
    ref = hf_model(path)
    assert ref.config.sliding_window == WINDOW and "sliding_attention" in ref.config.layer_types
    return path, [hf_greedy(ref, ids, GREEDY.max_tokens) for ids in [DOC, *SIBLINGS]]


def run_counting_pages(llm: LLM, ids: list[int]) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
    """Greedy tokens of ``ids`` and, after every step, the pages the request holds per SP rank: (full, window)."""
    engine = llm.engine
    engine.add_request(GenerateRequest("long", ids, GREEDY))
    tokens, held = [], []
    while engine.has_unfinished():
        seq = engine.seqs.get("long")
        outputs = engine.step()
        if seq is not None and seq.slot >= 0:  # still running
            held.append(engine.cache.held_pages(seq))
        tokens += [t for o in outputs for t in o.new_token_ids]
    return tokens, held


@pytest.mark.parametrize("sp", [1, 2])
def test_window_pages_are_bounded_and_returned(reference, sp):
    path, want = reference
    with LLM(path, sp_size=sp, **ENGINE) as llm:
        cache = llm.engine.cache
        free_at_start = [cache.free_count(r) for r in range(sp)]
        assert free_at_start == [cache.usable_pages] * sp
        tokens, held = run_counting_pages(llm, DOC)
        assert tokens == want[0]
        # full layers: every row stays, so the last step holds the whole context (300 + 19 rows over the ranks)
        full_end = held[-1][0]
        assert sum(full_end) >= math.ceil((len(DOC) + GREEDY.max_tokens - 1) / PAGE)
        assert max(full_end) >= math.ceil((len(DOC) + GREEDY.max_tokens - 1) / sp / PAGE)
        # window layers: the rows a step's queries see (window - 1 before it, its own new rows: at most a chunk
        # per rank, zigzag rounding included) over at most one more page at each end, and the window before the
        # prompt's end, which the request keeps for the prefix cache
        live = math.ceil((WINDOW - 1 + CHUNK + 2) / PAGE) + 1
        kept = math.ceil(WINDOW / PAGE) + 1
        most = max(w for _, window in held for w in window)
        assert most <= live + kept, held
        assert most < max(full_end) // 2  # bounded by the window, not the context
        decode = [max(window) for _, window in held[-GREEDY.max_tokens // 2 :]]
        assert max(decode) <= math.ceil(WINDOW / PAGE) + 1 + kept, held

        # siblings of a document: the first computes the prompt and keeps the window before its branch point
        # (where it leaves the cached document), the second is served up to that point, mid-window and mid-page
        first, second = (llm.generate([ids], GREEDY)[0] for ids in SIBLINGS)
        assert first.token_ids == want[1]
        assert second.token_ids == want[2]
        assert second.cached_tokens == 251

        graphs = llm.engine.runner.graphs
        assert graphs.steps > 0 and (graphs.extend_steps > 0) == (sp == 1)
        assert llm.engine.stats().kv_pages_used == 0
        assert llm.engine.stats().kv_pages_cached > 0
        llm.engine.flush_prefix_cache()
        assert [cache.free_count(r) for r in range(sp)] == free_at_start
        assert llm.engine.stats().kv_pages_cached == 0
