"""Qwen3.5 / Qwen3.5-MoE / Qwen3-Next (Gated DeltaNet hybrids) in our engine vs transformers (CPU, fp32).

Same tolerance as :mod:`tests.models.test_parity`: both sides compute in fp32 with different kernels (our chunked
GDN and varlen conv vs the reference's, fused vs separate projections), ``atol = 1e-4 * max|logit|``. Greedy tokens
must be identical; they run through the decode path (conv state shift, one-token delta rule) for 32 steps.
"""

from __future__ import annotations

import pytest
import torch

from server import LLM, SamplingParams
from tests.helpers import assert_logits_close, hf_model, prompt, save_tiny_model

ARCHS = ["qwen3_5", "qwen3_next", "qwen3_5_moe"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt"))
    return {a: save_tiny_model(a, root) for a in [*ARCHS, "qwen3_5_vl"]}


def reference_run(ref, ids: list[int]) -> tuple[torch.Tensor, list[int]]:
    with torch.no_grad():
        logits = ref(torch.tensor([ids])).logits[0]
        # an explicit mask: otherwise transformers masks prompt tokens equal to pad_token_id
        gen = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):]
    return logits, gen.tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_logits_and_greedy_match_transformers(models, arch):
    ids = prompt(77)  # not a multiple of the 64-token GDN chunk
    ref_logits, ref_gen = reference_run(hf_model(models[arch]), ids)
    with LLM(models[arch], device="cpu") as llm:
        assert_logits_close(llm.engine.prompt_logits(ids), ref_logits)
        out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    assert out.token_ids == ref_gen


def test_vision_language_checkpoint_serves_its_language_model(models, caplog):
    """A Qwen3_5ForConditionalGeneration checkpoint (nested text config, ``model.language_model.*`` names, a vision
    tower) gives the logits and greedy tokens of transformers' full model on text input."""
    import transformers as tf

    ids = prompt(40)
    ref = tf.AutoModelForImageTextToText.from_pretrained(models["qwen3_5_vl"], dtype=torch.float32).eval()
    ref_logits, ref_gen = reference_run(ref, ids)
    with caplog.at_level("INFO"), LLM(models["qwen3_5_vl"], device="cpu") as llm:
        assert_logits_close(llm.engine.prompt_logits(ids), ref_logits)
        assert llm.generate([ids], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0].token_ids \
            == ref_gen
    assert "vision-tower tensors" in caplog.text


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_next"])
def test_chunked_prefill_matches_unchunked(models, arch):
    """Chunks smaller than and not dividing the 64-token GDN chunk and shorter than the conv kernel carry the
    recurrent and conv states across steps."""
    ids = prompt(150)
    with LLM(models[arch], device="cpu", chunked_prefill_size=0) as llm:
        full = llm.engine.prompt_logits(ids)
    for chunk in (3, 7, 50, 100):
        with LLM(models[arch], device="cpu", chunked_prefill_size=chunk, page_size=4) as llm:
            assert_logits_close(llm.engine.prompt_logits(ids), full)


def test_mixed_batch_equals_each_alone(models):
    """Batched varlen prefill and batched decode (pool slots in any order) equal each request alone."""
    prompts = [prompt(n, seed=3) for n in (5, 70, 1, 33, 130)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with LLM(models["qwen3_next"], device="cpu", chunked_prefill_size=64) as llm:
        together = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        alone = [llm.generate([p], params)[0].token_ids for p in prompts]
    assert together == alone
