"""--max-total-tokens caps each rank's KV pool (SGLang's flag): the pool holds exactly that many tokens, requests
that fit it run unchanged, and one that can never fit is refused with a readable error."""

from __future__ import annotations

import pytest

from server import LLM, SamplingParams
from tests.helpers import prompt, save_tiny_model

ENGINE = dict(device="cpu", page_size=16, cpu_cache_gb=0.1, seed=0)


def test_the_cap_sizes_the_pool_and_leaves_answers_unchanged(tmp_path):
    path = save_tiny_model("llama", str(tmp_path))
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ids = [prompt(40, seed=1)]
    with LLM(path, **ENGINE) as llm:
        assert llm.engine.runner.num_pages > 5
        free = llm.generate(ids, greedy)[0].token_ids
    with LLM(path, max_total_tokens=64, **ENGINE) as llm:
        assert llm.engine.runner.num_pages == 1 + 64 // 16  # the scratch page and four usable pages
        assert llm.generate(ids, greedy)[0].token_ids == free
        with pytest.raises(Exception, match="(?i)token|cache|kv|long"):
            llm.generate([prompt(100, seed=2)], greedy)


def test_a_cap_below_one_page_is_refused(tmp_path):
    from server.config import EngineConfig

    with pytest.raises(ValueError, match="--max-total-tokens"):
        EngineConfig(max_total_tokens=8, page_size=16).validate()
