"""What the tests share: devices and markers, dtype tolerances, and tiny random Hugging Face checkpoints (saved
with transformers' save_pretrained).

Checkpoint shapes are uneven on purpose: GQA ratio > 1, head_dim != hidden / heads where the architecture allows
it, odd vocabulary sizes. ``initializer_range`` is larger than real models' so logits are well spread and greedy
decoding is not decided by rounding noise.
"""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

# ---- devices and markers ----------------------------------------------------------------------------------------
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_2_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


def _flashinfer_importable() -> bool:
    from server.kernels.flashinfer_attention import flashinfer_module

    return flashinfer_module() is not None


needs_flashinfer = pytest.mark.skipif(not torch.cuda.is_available() or not _flashinfer_importable(),
                                      reason="needs a CUDA GPU with flashinfer")

# ---- tolerances: fp32 results of different summation orders (kernels vs references, ranks vs one rank) ---------
FP32_TOL = {"rtol": 1e-5, "atol": 1e-4}


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32 logits of two computations of one model (summation orders differ): relative to the largest logit."""
    scale = ref.abs().max().item()
    torch.testing.assert_close(ours.float(), ref.float(), atol=1e-4 * scale, rtol=1e-4)


def prompt(n: int, vocab: int = 211, seed: int = 0) -> list[int]:
    """``n`` random token ids, the same for the same arguments."""
    g = torch.Generator().manual_seed(seed + n)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


# ---- engine runs against the single-rank engine ------------------------------------------------------------------
def single_rank_reference(root: str, archs: tuple[str, ...], engine: dict, long: list[int], batch: list[list[int]],
                          greedy) -> dict:
    """Per architecture: (checkpoint, prompt logits of ``long`` and of ``batch[1]``, greedy tokens of ``batch``)
    of the engine at sp = tp = 1, the reference every parallel configuration must reproduce."""
    from server import LLM

    out = {}
    for arch in archs:
        path = save_tiny_model(arch, root)
        with LLM(path, **engine) as llm:
            out[arch] = (path, llm.engine.prompt_logits(long), llm.engine.prompt_logits(batch[1]),
                         [o.token_ids for o in llm.generate(batch, greedy, use_tqdm=False)])
    return out


def assert_matches_reference(llm, reference: tuple, long: list[int], batch: list[list[int]], greedy) -> None:
    """``llm`` reproduces the reference's prompt logits (fp32 tolerance) and exact greedy tokens, and frees every
    rank's caches afterwards."""
    _, logits, short_logits, tokens = reference
    assert_logits_close(llm.engine.prompt_logits(long), logits)
    assert_logits_close(llm.engine.prompt_logits(batch[1]), short_logits)
    assert [o.token_ids for o in llm.generate(batch, greedy, use_tqdm=False)] == tokens
    stats = llm.engine.stats()
    assert stats.kv_pages_used == 0 and stats.state_slots_used == 0  # every rank's caches freed

# ---- tiny checkpoints ------------------------------------------------------------------------------------------

COMMON = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=1024, initializer_range=0.15, rms_norm_eps=1e-5, tie_word_embeddings=False)


def tiny_config(arch: str, **over):
    import transformers as tf

    if arch == "llama":
        cfg = tf.LlamaConfig(**{**COMMON, "head_dim": 24, "num_hidden_layers": 2,
                                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                **over})
    elif arch == "llama_tied":
        cfg = tf.LlamaConfig(**{**COMMON, "num_hidden_layers": 2, "tie_word_embeddings": True, **over})
    elif arch == "llama_yarn":
        cfg = tf.LlamaConfig(**{**COMMON, "num_hidden_layers": 1,
                                "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 128}, **over})
    elif arch == "mistral":
        cfg = tf.MistralConfig(**{**COMMON, "num_hidden_layers": 2, "sliding_window": None,
                                  "rope_scaling": {"rope_type": "linear", "factor": 2.0}, **over})
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**{**COMMON, "num_hidden_layers": 2, **over})
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**{**COMMON, "head_dim": 40, "num_hidden_layers": 2, **over})
    elif arch.startswith("minimax") and arch != "minimax_m2":
        n = 8 if arch == "minimax_7to1" else 4
        types = {"minimax_7to1": ["linear_attention"] * 7 + ["full_attention"],
                 "minimax_linear": ["linear_attention"] * n}.get(arch,
                                                                  ["linear_attention", "full_attention"] * (n // 2))
        cfg = tf.MiniMaxConfig(**{**COMMON, "head_dim": 24, "num_hidden_layers": n, "layer_types": types,
                                  "num_local_experts": 4, "num_experts_per_tok": 2, "block_size": 16,
                                  "full_attn_alpha_factor": 1.1, "full_attn_beta_factor": 0.9,
                                  "linear_attn_alpha_factor": 0.8, "linear_attn_beta_factor": 1.2,
                                  "mlp_alpha_factor": 1.05, "mlp_beta_factor": 0.95, **over})
    elif arch == "qwen3_moe":  # the second layer dense (mlp_only_layers); 6 experts: not a multiple of 4 or 8 ranks
        cfg = tf.Qwen3MoeConfig(**{**COMMON, "head_dim": 40, "num_hidden_layers": 2, "num_experts": 6,
                                   "num_experts_per_tok": 2, "moe_intermediate_size": 24, "norm_topk_prob": True,
                                   "mlp_only_layers": [1], **over})
    elif arch == "minimax_m2":  # partial rotary (12 of 24), sigmoid routing with a correction bias
        cfg = tf.MiniMaxM2Config(**{**COMMON, "intermediate_size": 24, "head_dim": 24, "rotary_dim": 12,
                                    "num_hidden_layers": 2, "num_local_experts": 6, "num_experts_per_tok": 2,
                                    "bos_token_id": None, "eos_token_id": None, **over})
    elif arch == "glm4_moe":  # a dense first layer, grouped routing (3 groups of 2, best 2 compete), shared expert
        cfg = tf.Glm4MoeConfig(**{**COMMON, "head_dim": 24, "num_hidden_layers": 2, "n_routed_experts": 6,
                                  "num_experts_per_tok": 2, "moe_intermediate_size": 24, "n_group": 3,
                                  "topk_group": 2, "routed_scaling_factor": 2.5, "first_k_dense_replace": 1,
                                  "use_qk_norm": True, "attention_bias": True, **over})
    elif arch == "qwen3_5_vl":  # a vision-language checkpoint whose language model is qwen3_5
        vision = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=COMMON["hidden_size"],
                      patch_size=4, temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16)
        cfg = tf.Qwen3_5Config(text_config=tiny_config("qwen3_5").to_dict(), vision_config=vision, **over)
    elif arch.startswith(("qwen3_5", "qwen3_next")):
        # GDN: 2 key heads serve 6 value heads, key dim != value dim != attention head dim; two full-attention
        # layers in a row in qwen3_5, the real 3:1 layout and a dense layer among MoE ones in qwen3_next
        gdn = dict(linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=16,
                   linear_value_head_dim=12, linear_conv_kernel_dim=4, head_dim=40)
        moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=40)
        if arch == "qwen3_next":
            cfg = tf.Qwen3NextConfig(**{**COMMON, **gdn, **moe, "num_hidden_layers": 4, "mlp_only_layers": [1],
                                        "layer_types": ["linear_attention"] * 3 + ["full_attention"], **over})
        else:
            types = ["linear_attention", "full_attention", "full_attention", "linear_attention"]
            cls = tf.Qwen3_5MoeTextConfig if arch == "qwen3_5_moe" else tf.Qwen3_5TextConfig
            cfg = cls(**{**COMMON, **gdn, **(moe if arch == "qwen3_5_moe" else {}), "num_hidden_layers": 4,
                         "layer_types": types, **over})
    elif arch.startswith("deepseek_v3"):
        # odd LoRA ranks, qk head (12 + 8) != v head (10), yarn with mscale_all_dim (scales the softmax), one
        # dense layer then MoE layers: 8 experts in 4 groups, 2 groups kept, 3 experts per token, a shared expert
        mla = dict(q_lora_rank=23, kv_lora_rank=19, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
                   num_key_value_heads=4,
                   rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                                 "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1})
        moe = dict(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, moe_intermediate_size=24,
                   n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5)
        if arch == "deepseek_v3_nolora":  # no q LoRA, plain RoPE, no interleave, every layer sparse
            mla.update(q_lora_rank=None, rope_scaling=None, rope_interleave=False)
            moe.update(first_k_dense_replace=0)
        cfg = tf.DeepseekV3Config(**{**COMMON, **mla, **moe, "num_hidden_layers": 3, **over})
    elif arch == "kimi_linear":
        # KDA layers around one MLA layer (no q LoRA, no RoPE), odd kv LoRA rank, KDA head dim != MLA head dims,
        # a dense first MLP then MoE: 8 experts in 2 groups, 1 group kept, 3 experts per token, a shared expert
        cfg = tf.KimiLinearConfig(**{**COMMON, "num_key_value_heads": 4, "num_hidden_layers": 4, "q_lora_rank": None,
                                     "kv_lora_rank": 19, "qk_nope_head_dim": 12, "qk_rope_head_dim": 8,
                                     "v_head_dim": 10, "linear_head_dim": 16, "linear_num_heads": 4,
                                     "num_local_experts": 8, "n_group": 2, "topk_group": 1, "num_experts_per_tok": 3,
                                     "moe_intermediate_size": 24, "n_shared_experts": 1, "routed_scaling_factor": 2.5,
                                     "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                                     "layer_types": ["linear_attention", "full_attention", "linear_attention",
                                                     "linear_attention"],
                                     "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"], **over})
    else:
        raise ValueError(arch)
    return cfg


def save_tiny_model(arch: str, root: str, seed: int = 0, **over) -> str:
    """Save a tiny random ``arch`` checkpoint under ``root`` and return its directory."""
    import transformers as tf

    path = os.path.join(root, arch)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(seed)
    cfg = tiny_config(arch, **over)
    auto = tf.AutoModelForImageTextToText if arch.endswith("_vl") else tf.AutoModelForCausalLM
    model = auto.from_config(cfg, dtype=torch.float32)
    for name, buf in model.named_buffers():
        # initialised to zero; a nonzero bias makes the tests see that it steers the choice of experts
        if name.endswith("e_score_correction_bias"):
            buf.normal_(0.0, 0.1)
    model.save_pretrained(path)
    return path


GDN_MODELING = ("qwen3_5", "qwen3_5_moe", "qwen3_next")


def hf_model(path: str):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of ``ids`` (no EOS stop)."""
    with torch.no_grad():
        # an explicit mask: otherwise transformers masks prompt tokens equal to pad_token_id
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def transformers_reference(path: str, long: list[int], batch: list[list[int]], max_new_tokens: int) -> tuple:
    """(checkpoint, prompt logits of ``long`` and of ``batch[1]``, greedy tokens of each of ``batch``) computed by
    transformers in fp32: the reference :func:`assert_matches_reference` takes."""
    model = hf_model(path)
    with torch.no_grad():
        logits = [model(torch.tensor([ids])).logits[0] for ids in (long, batch[1])]
    return (path, *logits, [hf_greedy(model, ids, max_new_tokens) for ids in batch])


@contextlib.contextmanager
def torch_gdn_reference():
    """Inside: transformers' Gated DeltaNet runs its own torch recurrence even where fla-core is installed (fla's
    kernels compute fp32 inputs in TF32: not an fp32 reference). Outside: transformers as installed."""
    import inspect

    swapped = []
    for name in GDN_MODELING:
        mod = sys.modules.get(f"transformers.models.{name}.modeling_{name}")
        if mod is None:
            continue
        for fn in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule"):
            if not hasattr(mod, fn):  # a transformers that binds its kernels elsewhere: no silent fla reference
                raise RuntimeError(f"{mod.__name__} has no {fn}: cannot force transformers' torch GDN recurrence")
            swapped.append((mod, fn, getattr(mod, fn)))
            setattr(mod, fn, inspect.unwrap(getattr(mod, fn)))
    try:
        yield
    finally:
        for mod, fn, original in swapped:
            setattr(mod, fn, original)


# ---- FP8 checkpoints -------------------------------------------------------------------------------------------
def fp8_quantize_blocks(w: torch.Tensor, bn: int, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> FP8 ``q`` and fp32 ``scale [ceil(N/bn), ceil(K/bk)]`` (``w ~= q * scale`` blockwise; the
    last blocks may be short), as block-scaled FP8 checkpoints store them (``weight_scale_inv``)."""
    n, k = w.shape
    nb, kb = -(-n // bn), -(-k // bk)
    padded = torch.nn.functional.pad(w.float(), (0, kb * bk - k, 0, nb * bn - n)).view(nb, bn, kb, bk)
    scale = padded.abs().amax(dim=(1, 3)) / 448.0
    q = (padded / scale[:, None, :, None]).view(nb * bn, kb * bk)[:n, :k].to(torch.float8_e4m3fn)
    return q, scale


def fp8_dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    n, k = q.shape
    return q.float() * scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]


def is_fp8_linear_weight(name: str) -> bool:
    """The projection and expert weights FP8 checkpoints quantize (not embeddings, LM head, norms or routers)."""
    return name.endswith(".weight") and ("_proj." in name or ".experts." in name)


def save_fp8_model(arch: str, root: str, scheme: str, block: tuple[int, int] = (32, 16),
                   keep: tuple[str, ...] = (), **over) -> tuple[str, str]:
    """An FP8 checkpoint made from the tiny random ``arch`` checkpoint, and its dequantized fp32 twin (what
    ``transformers`` runs as the reference). ``scheme``: ``block`` (``quant_method: fp8``, ``weight_block_size``
    ``block``, ``weight_scale_inv``), ``channel`` or ``tensor`` (compressed-tensors, ``weight_scale``, dynamic
    per-token activations). Weights whose names contain a ``keep`` fragment stay fp32 and are listed in the
    config's ``modules_to_not_convert`` / ``ignore``."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    src = save_tiny_model(arch, root, **over)
    tag = f"{arch}_fp8_{scheme}_{block[0]}x{block[1]}" + ("_keep" if keep else "")
    fp8_dir, ref_dir = os.path.join(root, tag), os.path.join(root, tag + "_dequantized")
    if os.path.isfile(os.path.join(fp8_dir, "config.json")):
        return fp8_dir, ref_dir
    tensors = load_file(os.path.join(src, "model.safetensors"))
    out, ref, kept = {}, {}, []
    for name, w in tensors.items():
        module = name.removesuffix(".weight")
        if not is_fp8_linear_weight(name) or w.dim() != 2:
            out[name] = ref[name] = w
            continue
        if any(k in name for k in keep):
            out[name] = ref[name] = w
            kept.append(module)
            continue
        if scheme == "block":
            q, scale = fp8_quantize_blocks(w, *block)
            out[module + ".weight_scale_inv"] = scale
            ref[name] = fp8_dequantize_blocks(q, scale, *block)
        else:
            bn = w.shape[0] if scheme == "tensor" else 1
            q, scale = fp8_quantize_blocks(w, bn, w.shape[1])
            out[module + ".weight_scale"] = scale.reshape(-1) if scheme == "tensor" else scale
            ref[name] = fp8_dequantize_blocks(q, scale, bn, w.shape[1])
        out[name] = q
    for d in (fp8_dir, ref_dir):
        shutil.copytree(src, d)
    save_file(out, os.path.join(fp8_dir, "model.safetensors"))
    save_file(ref, os.path.join(ref_dir, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    if scheme == "block":
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": list(block), "modules_to_not_convert": kept}
    else:
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head", *kept],
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": scheme, "symmetric": True, "dynamic": False},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}}}
    with open(os.path.join(fp8_dir, "config.json"), "w") as f:
        json.dump(cfg, f)
    return fp8_dir, ref_dir
