"""DeepSeek-V3 (MLA with and without q LoRA, yarn mscale, grouped sigmoid routing) and Kimi-Linear (KDA + MLA
without RoPE) in our engine vs transformers (CPU, fp32).

Same tolerance as :mod:`tests.models.test_parity`: ``atol = 1e-4 * max|logit|`` on the prompt logits; greedy tokens
identical through the decode path. Routing uses a nonzero score-correction bias (tests/helpers.py), so a routing
that ignores it, or picks experts outside the kept groups, changes the tokens.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import sys

import pytest
import torch
from safetensors.torch import save_file

from server import LLM, SamplingParams
from server.models.kimi_linear import KimiLinearConfig
from tests.engine.test_gpu_engine import MOE_ARCHS, check_bf16, check_tokens
from tests.helpers import ON_GPU, assert_logits_close, hf_model, needs_cuda, prompt, save_tiny_model

ARCHS = ["deepseek_v3", "deepseek_v3_nolora", "kimi_linear"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt"))
    return {a: save_tiny_model(a, root) for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_logits_and_greedy_match_transformers(models, arch):
    ids = prompt(77)  # crosses the 64-token chunk of the KDA layers
    ref = hf_model(models[arch])
    with torch.no_grad():
        ref_logits = ref(torch.tensor([ids])).logits[0]
        ref_gen = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):]
    with LLM(models[arch], device="cpu") as llm:
        assert_logits_close(llm.engine.prompt_logits(ids), ref_logits)
        out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    assert out.token_ids == ref_gen.tolist()


def test_mtp_layers_are_skipped_with_one_log_line(models, tmp_path, caplog):
    """A checkpoint with a multi-token-prediction layer after the last decoder layer (as DeepSeek-V3 publishes)
    serves the same logits as one without."""
    src = models["deepseek_v3"]
    dst = tmp_path / "with_mtp"
    dst.mkdir()
    for f in os.listdir(src):
        os.symlink(os.path.join(src, f), dst / f)
    save_file({"model.layers.3.eh_proj.weight": torch.zeros(64, 128),
               "model.layers.3.self_attn.kv_b_proj.weight": torch.zeros(88, 19)}, str(dst / "mtp.safetensors"))
    ids = prompt(20)
    with LLM(src, device="cpu") as llm:
        want = llm.engine.prompt_logits(ids)
    with caplog.at_level(logging.INFO), LLM(str(dst), device="cpu") as llm:
        assert_logits_close(llm.engine.prompt_logits(ids), want)
    assert "multi-token-prediction layers are not served: skipped 2 tensors" in caplog.text


def test_published_kimi_linear_config_keys():
    """Kimi-Linear's config.json as published: 1-indexed ``linear_attn_config`` layer lists, ``model_max_length``,
    MoE keys under their Moonshot names."""
    raw = dict(architectures=["KimiLinearForCausalLM"], vocab_size=163840, hidden_size=2304, num_hidden_layers=27,
               num_attention_heads=32, num_key_value_heads=32, intermediate_size=9216, model_max_length=1048576,
               kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
               num_experts=256, num_experts_per_token=8, num_expert_group=1, topk_group=1, num_shared_experts=1,
               moe_intermediate_size=1024, moe_renormalize=True, routed_scaling_factor=2.446, first_k_dense_replace=1,
               linear_attn_config={"head_dim": 128, "num_heads": 32, "short_conv_kernel_size": 4,
                                   "full_attn_layers": [4, 8, 12, 16, 20, 24, 27],
                                   "kda_layers": [i for i in range(1, 28) if i not in (4, 8, 12, 16, 20, 24, 27)]})
    cfg = KimiLinearConfig.from_hf(raw)
    assert cfg.layer_types[3] == cfg.layer_types[26] == "full_attention" and cfg.layer_types[0] == "linear_attention"
    assert cfg.layer_types.count("full_attention") == 7
    assert cfg.moe.num_experts == 256 and cfg.moe.top_k == 8 and cfg.moe.shared_intermediate_size == 1024
    assert cfg.sparse_layers == frozenset(range(1, 27)) and cfg.q_lora_rank is None
    assert cfg.max_position_embeddings == 1048576 and cfg.head_dim == 192
    assert (cfg.linear_num_heads, cfg.linear_head_dim, cfg.linear_conv_kernel_dim) == (32, 128, 4)


@contextlib.contextmanager
def torch_kda_reference():
    """transformers' Kimi-Linear runs its own torch KDA loops inside (fla-core's kernels compute fp32 in TF32)."""
    mod = sys.modules["transformers.models.kimi_linear.modeling_kimi_linear"]
    names = ("chunk_kimi_delta_attention", "recurrent_kimi_delta_attention")
    saved = {n: getattr(mod, n) for n in names}
    for n in names:
        setattr(mod, n, inspect.unwrap(saved[n]))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(mod, n, f)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_cuda_within_transformers_bf16_error(models, arch):
    """bf16 on CUDA (fla-core's KDA kernels for the KDA layers): our logits no further from transformers' fp32 than
    transformers' own bf16 (the bound of tests/engine/test_gpu_engine.py); greedy tokens near-argmaxes."""
    ids = prompt(300)
    with LLM(models[arch], **ON_GPU, dtype="bfloat16", chunked_prefill_size=128, cuda_graph_max_bs=4) as llm:
        ours = llm.engine.prompt_logits(ids)
        out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0].token_ids
    ref = hf_model(models[arch]).cuda()
    x = torch.tensor([ids + out], device="cuda")
    with torch.no_grad():
        with torch_kda_reference() if arch == "kimi_linear" else contextlib.nullcontext():
            fp32 = ref(x).logits[0].float()
        hf_err = (ref.to(torch.bfloat16)(x).logits[0].float() - fp32).abs()
    check_bf16(ours, fp32[: len(ids)], hf_err[: len(ids)], moe=arch in MOE_ARCHS)
    check_tokens(out, fp32[len(ids) - 1 : -1], hf_err[len(ids) - 1 : -1], moe=arch in MOE_ARCHS)
