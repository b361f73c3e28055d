"""FP8 on a GPU: tiny FP8 checkpoints run FP8 GEMMs in bf16 against references on the dequantized weights; an FP8 KV
cache read by flashinfer's paged kernels against the torch reference reading the same FP8 pages; each FP8 GEMM path
against an fp32 matmul of its dequantized operands.

Steps of more than ``GEMV_MAX_ROWS`` rows (prefill) quantize their activations per token (or per token and group of
128 for block-scaled weights), as the checkpoints' recipes define; random tiny models amplify that rounding (a few
percent per GEMM) into different greedy tokens within a few steps, whatever the kernels (a CPU run in fp32 with the
same activation quantization, ``fp8_gemm.EMULATE_W8A8``, agrees with ``transformers`` no better). So the model tests
set the GPU beside that fp32 run of the same recipe: its error against ``transformers`` may exceed the run's by 0.05
of the largest logit, and its identical continuations may fall 20 points below the run's, no more (the GPU against
the run itself is printed). The
checkpoints use a smaller ``initializer_range`` than the other tiny models (0.05), which keeps that amplification
near real models'.
Run: ``pytest -q -s tests/models/test_fp8_gpu.py`` on a CUDA machine.
"""

from __future__ import annotations

import pytest
import torch

from server import LLM, SamplingParams
from tests.helpers import ON_GPU, gpu, hf_model, needs_cuda, needs_flashinfer, prompt, save_fp8_model

pytestmark = [gpu, needs_cuda]

# head dim 64 (flashinfer), every K a multiple of 128 (the block-scaled GEMM's groups)
SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             initializer_range=0.05)
PROMPTS = [prompt(24 + 3 * i, seed=i) for i in range(40)]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def cpu_w8a8_continuations(path: str) -> tuple[list[list[int]], torch.Tensor]:
    """The same checkpoint on CPU in fp32 with the activations quantized as the GPU's W8A8 steps do."""
    from server.kernels import fp8_gemm

    saved, fp8_gemm.EMULATE_W8A8 = fp8_gemm.EMULATE_W8A8, True
    try:
        with LLM(path, device="cpu") as llm:
            logits = llm.engine.prompt_logits(PROMPTS[-1]).float().cpu()
            return [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)], logits
    finally:
        fp8_gemm.EMULATE_W8A8 = saved


def agreement(ref: tuple, emulated: tuple, ours: list[list[int]], logits: torch.Tensor, what: str) -> None:
    """Print and check: the GPU's prompt logits within the fp32 W8A8 run's error (against transformers on the
    dequantized weights) plus 0.05 of the largest logit, and its greedy continuations at most 20 points less often
    identical to transformers' than the fp32 W8A8 run's."""
    (ref_tokens, ref_logits), (emu_tokens, emu_logits) = ref, emulated
    scale = ref_logits.abs().max()
    rel = ((logits - ref_logits).abs().max() / scale).item()
    rel_emu = ((emu_logits - ref_logits).abs().max() / scale).item()
    rel_gpu_emu = ((logits - emu_logits).abs().max() / scale).item()
    same = sum(a == b for a, b in zip(ours, ref_tokens)) / len(PROMPTS)
    same_emu = sum(a == b for a, b in zip(emu_tokens, ref_tokens)) / len(PROMPTS)
    first = sum(a[:1] == b[:1] for a, b in zip(ours, ref_tokens)) / len(PROMPTS)
    print(f"{what}: continuations identical to transformers fp32: GPU {same:.0%}, fp32 W8A8 {same_emu:.0%} "
          f"(first token: GPU {first:.0%}); prompt logits' max error / largest logit: GPU {rel:.4f}, "
          f"fp32 W8A8 {rel_emu:.4f}, GPU vs fp32 W8A8 {rel_gpu_emu:.4f}")
    assert rel <= rel_emu + 0.05
    assert same >= same_emu - 0.2


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
    ref, emulated = transformers_continuations(dequantized), cpu_w8a8_continuations(fp8)
    with LLM(fp8, **ON_GPU, dtype="bfloat16") as llm:
        logits = llm.engine.prompt_logits(PROMPTS[-1]).float().cpu()
        ours = [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    agreement(ref, emulated, ours, logits, f"FP8 {scheme}")


@pytest.mark.parametrize("scheme,block", [("block", (128, 128)), ("channel", (1, 1))])
def test_fp8_moe_checkpoint_on_gpu_matches_dequantized_fp32_reference(tmp_path, scheme, block):
    """A Qwen3-MoE with FP8 experts (8 experts, top 2): prefill steps over 128 tokens run the per-expert loop of FP8
    GEMMs, short steps and graph-captured decode steps the dequantized gathered / dense forms."""
    moe = dict(SHAPE, moe_intermediate_size=256, num_experts=8)
    fp8, dequantized = save_fp8_model("qwen3_moe", str(tmp_path), scheme, block, **moe)
    ref, emulated = transformers_continuations(dequantized), cpu_w8a8_continuations(fp8)
    with LLM(fp8, **ON_GPU, dtype="bfloat16") as llm:
        experts = llm.engine.runner.model.moe_layers()[0]
        assert experts.w13.dtype == experts.w2.dtype == torch.float8_e4m3fn
        logits = llm.engine.prompt_logits(PROMPTS[-1]).float().cpu()
        ours = [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    agreement(ref, emulated, ours, logits, f"FP8 MoE {scheme}")


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
    first = sum(a[:2] == b[:2] for a, b in zip(runs["flashinfer"], runs["torch"])) / len(PROMPTS)
    print(f"FP8 KV: flashinfer vs torch reference, {same:.0%} of continuations identical, {first:.0%} of the first "
          "two tokens (the second is the first read of the FP8 pages)")
    assert first >= 0.9
    assert same >= 0.5


@pytest.mark.parametrize("rows", [1, 8, 32, 200])
@pytest.mark.parametrize("block_k", [None, 128])
def test_fp8_gemm_against_fp32_product_of_its_dequantized_operands(rows, block_k):
    """Each CUDA FP8 GEMM path (the decode GEMV up to ``GEMV_MAX_ROWS`` rows, W8A8 above: ``_scaled_mm`` for per-row
    scales, the Triton block GEMM for blocks) against the fp32 product of the operands it multiplies: x and the
    dequantized weight (GEMV), the dequantized FP8 activations and weight (W8A8). Bound: bf16 output rounding."""
    from server.kernels.fp8 import dequantize, quantize_per_row
    from server.kernels.fp8_gemm import GEMV_MAX_ROWS, fp8_linear, quantize_activations

    gen = torch.Generator(device="cuda").manual_seed(rows)
    k, n = 1024, 768
    q, scale = quantize_per_row(torch.randn(n, k, device="cuda", generator=gen) * 0.05, block_k)
    bk = block_k or k
    x = torch.randn(rows, k, device="cuda", generator=gen).to(torch.bfloat16)
    got = fp8_linear(x, q, scale, bk).float()
    if rows <= GEMV_MAX_ROWS:
        xd = x.float()
    else:
        xq, xs = quantize_activations(x, block_k)
        xd = xq.float() * xs if xs.shape[1] == 1 else dequantize(xq, xs, bk)
    want = xd @ dequantize(q, scale, bk).t()
    rel = ((got - want).abs().max() / want.abs().max()).item()
    print(f"FP8 GEMM rows {rows}, blocks {block_k}: max error / largest output {rel:.2e}")
    assert rel < 1e-2
