"""FP8 on a GPU: tiny FP8 checkpoints run FP8 GEMMs (activations quantized per token, or per token and group of 128
for block-scaled weights) in bf16, against ``transformers`` in fp32 on the dequantized weights; an FP8 KV cache read
by flashinfer's paged kernels against the torch reference reading the same FP8 pages.

FP8 activations and bf16 change the numbers, so the bar is statistical: at least 95% of 16-token greedy
continuations identical, and the prompt logits' max error relative to the largest logit printed (and bounded).
Run: ``pytest -q -s tests/models/test_fp8_gpu.py`` on a CUDA machine.
"""

from __future__ import annotations

import pytest
import torch

from server import LLM, SamplingParams
from tests.helpers import ON_GPU, gpu, hf_model, needs_cuda, needs_flashinfer, prompt, save_fp8_model

pytestmark = [gpu, needs_cuda]

# head dim 64 (flashinfer), every K a multiple of 128 (the block-scaled GEMM's groups)
SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
PROMPTS = [prompt(24 + 3 * i, seed=i) for i in range(40)]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def transformers_continuations(path: str) -> tuple[list[list[int]], torch.Tensor]:
    ref = hf_model(path)
    outs = []
    with torch.no_grad():
        for ids in PROMPTS:
            gen = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
            outs.append(gen[0, len(ids):].tolist())
        logits = ref(torch.tensor([PROMPTS[-1]])).logits[0]
    return outs, logits


@pytest.mark.parametrize("scheme,block", [("block", (128, 128)), ("channel", (1, 1))])
def test_fp8_checkpoint_on_gpu_matches_dequantized_fp32_reference(tmp_path, scheme, block):
    fp8, dequantized = save_fp8_model("llama", str(tmp_path), scheme, block, **SHAPE)
    ref_tokens, ref_logits = transformers_continuations(dequantized)
    with LLM(fp8, **ON_GPU, dtype="bfloat16") as llm:
        logits = llm.engine.prompt_logits(PROMPTS[-1]).float().cpu()
        ours = [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    same = sum(a == b for a, b in zip(ours, ref_tokens)) / len(PROMPTS)
    rel = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
    print(f"FP8 {scheme}: {same:.0%} of 16-token continuations identical; logits max relative error {rel:.4f}")
    assert same >= 0.95
    assert rel < 0.05


@pytest.mark.parametrize("scheme,block", [("block", (128, 128)), ("channel", (1, 1))])
def test_fp8_moe_checkpoint_on_gpu_matches_dequantized_fp32_reference(tmp_path, scheme, block):
    """A Qwen3-MoE with FP8 experts (8 experts, top 2): prefill steps over 128 tokens run the per-expert loop of FP8
    GEMMs, short steps and graph-captured decode steps the dequantized gathered / dense forms."""
    moe = dict(SHAPE, moe_intermediate_size=256, num_experts=8)
    fp8, dequantized = save_fp8_model("qwen3_moe", str(tmp_path), scheme, block, **moe)
    ref_tokens, ref_logits = transformers_continuations(dequantized)
    with LLM(fp8, **ON_GPU, dtype="bfloat16") as llm:
        experts = llm.engine.runner.model.moe_layers()[0]
        assert experts.w13.dtype == experts.w2.dtype == torch.float8_e4m3fn
        logits = llm.engine.prompt_logits(PROMPTS[-1]).float().cpu()
        ours = [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    same = sum(a == b for a, b in zip(ours, ref_tokens)) / len(PROMPTS)
    rel = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
    print(f"FP8 MoE {scheme}: {same:.0%} of 16-token continuations identical; logits max relative error {rel:.4f}")
    assert same >= 0.95
    assert rel < 0.05


@needs_flashinfer
def test_fp8_kv_cache_on_flashinfer_matches_torch_reference(tmp_path):
    """The same FP8 pages read by flashinfer's kernels (scales applied as they load) and by the torch reference."""
    fp8, _ = save_fp8_model("llama", str(tmp_path), "channel", **SHAPE)
    runs = {}
    for backend in ("flashinfer", "torch"):
        with LLM(fp8, **ON_GPU, dtype="bfloat16", kv_cache_dtype="fp8_e4m3", attention_backend=backend,
                 page_size=16) as llm:
            runs[backend] = [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    same = sum(a == b for a, b in zip(runs["flashinfer"], runs["torch"])) / len(PROMPTS)
    print(f"FP8 KV: flashinfer vs torch reference, {same:.0%} of continuations identical")
    assert same >= 0.95
