"""Our engine vs transformers on tiny random checkpoints (CPU, fp32).

Tolerance: both sides compute in fp32 with different summation orders and kernels (blockwise lightning vs the
reference's, fused vs separate projections), so logits agree to a few fp32 ulps of accumulated error:
``atol = 1e-4 * max|logit|`` with ``rtol = 1e-4``. Greedy tokens must be identical.
"""

from __future__ import annotations

import pytest
import torch

from server import LLM, SamplingParams
from tests.helpers import assert_logits_close, hf_greedy, hf_model, prompt, save_tiny_model

ARCHS = ["llama", "llama_tied", "llama_yarn", "mistral", "qwen2", "qwen3", "minimax_alt", "minimax_7to1",
         "minimax_linear",  # lightning layers only, no KV cache at all
         "qwen3_moe", "minimax_m2", "glm4_moe"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt"))
    return {a: save_tiny_model(a, root) for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_logits_and_greedy_match_transformers(models, arch):
    path = models[arch]
    ref = hf_model(path)
    ids = prompt(77)  # not a multiple of the lightning block (16 in the reference, 64 ours)
    assert type(ref).__name__ == ref.config.architectures[0]  # the family's own transformers class
    with torch.no_grad():
        ref_logits = ref(torch.tensor([ids])).logits[0]
    ref_gen = hf_greedy(ref, ids, 32)
    with LLM(path, device="cpu") as llm:
        assert_logits_close(llm.engine.prompt_logits(ids), ref_logits)
        out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=3))[0]
    assert out.token_ids == ref_gen
    assert len(out.logprobs) == 32 and out.finish_reason == "length"


@pytest.mark.parametrize("arch", ["llama", "minimax_alt"])
def test_chunked_prefill_matches_unchunked(models, arch):
    ids = prompt(150)
    with LLM(models[arch], device="cpu", chunked_prefill_size=0) as llm:
        full = llm.engine.prompt_logits(ids)
    for chunk in (3, 7, 64, 100):  # smaller than the lightning block, not dividing it, equal to it, larger
        with LLM(models[arch], device="cpu", chunked_prefill_size=chunk, page_size=4) as llm:
            assert_logits_close(llm.engine.prompt_logits(ids), full)


@pytest.mark.parametrize("arch", ["qwen3", "minimax_7to1"])
def test_mixed_batch_equals_each_alone(models, arch):
    prompts = [prompt(n, seed=3) for n in (5, 70, 1, 33, 130)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with LLM(models[arch], device="cpu", chunked_prefill_size=64) as llm:
        together = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        alone = [llm.generate([p], params)[0].token_ids for p in prompts]
    assert together == alone
