"""What the tests share: devices and markers, dtype tolerances, tiny random Hugging Face checkpoints (saved with
transformers' save_pretrained) and the transformers references, functions run on every rank of a real SP x TP group,
the benchmark smoke tests' shrunk shapes, and real server processes for the HTTP tests (whose shared server fixture
is in ``tests/entrypoints/conftest.py``).

Checkpoint shapes are uneven on purpose: GQA ratio > 1, head_dim != hidden / heads where the architecture allows
it, odd vocabulary sizes. ``initializer_range`` is larger than real models' so logits are well spread and greedy
decoding is not decided by rounding noise.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch
import torch.multiprocessing as mp

from benchmarks.model_shapes import SHAPES
from server.execution.procutil import free_port
from server.sp.groups import ParallelState, destroy_parallel_state, init_parallel_state

# ---- devices and markers ----------------------------------------------------------------------------------------
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# A test's engine on the GPU: a small KV pool (--max-total-tokens), so several test processes (pytest -n) share one GPU
ON_GPU = dict(device="cuda", max_total_tokens=1 << 16)
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
        kw = {**COMMON, "intermediate_size": 24, "head_dim": 24, "rotary_dim": 12, "num_hidden_layers": 2,
              "num_local_experts": 6, "num_experts_per_tok": 2, "bos_token_id": None, "eos_token_id": None, **over}
        # the released checkpoints carry only the legacy rotary_dim (what the server reads); transformers before
        # 5.18 ignores it and rotates the whole head (huggingface/transformers#48241), so the reference also gets
        # the same partial rotation as partial_rotary_factor
        kw.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 5e6,
                                          "partial_rotary_factor": kw["rotary_dim"] / kw["head_dim"]})
        cfg = tf.MiniMaxM2Config(**kw)
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
    elif arch == "gpt_oss":
        # window 16 on alternating layers (prompts of a few hundred tokens cross many windows), learned sinks
        # (transformers initialises them randomly), 5 experts (not divisible by 2 or 4), YaRN RoPE
        cfg = tf.GptOssConfig(**{**COMMON, "head_dim": 24, "num_hidden_layers": 2, "sliding_window": 16,
                                 "num_local_experts": 5, "num_experts_per_tok": 2, "intermediate_size": 48,
                                 "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                                                     "beta_slow": 1.0, "truncate": False, "rope_theta": 10000.0,
                                                     "original_max_position_embeddings": 256}, **over})
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
    with torch.no_grad():
        for name, param in model.named_parameters():
            # linear biases (Qwen2's and GLM's q/k/v, gpt-oss's attention and expert biases) are initialised to
            # zero: nonzero ones make the tests see how each is sliced over TP and experts
            if name.endswith("bias") and not param.any():
                param.normal_(0.0, 0.1)
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


# ---- multi-rank groups: a function on every rank of a real SP x TP group (spawned processes, gloo / NCCL) --------
def _entry(rank: int, fn: Callable[[ParallelState], None], sp: int, tp: int, port: int, device_type: str) -> None:
    torch.set_num_threads(1)  # W processes share the machine's cores
    device = torch.device("cpu")
    if device_type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    pstate = init_parallel_state(rank, sp, tp, device, f"tcp://127.0.0.1:{port}", timeout_s=120)
    try:
        fn(pstate)
    except BaseException:
        # spawn reports only the first rank that exits, often a peer that saw this one's socket close
        print(f"rank {rank} (sp {pstate.sp_rank}, tp {pstate.tp_rank}) failed:", file=sys.stderr, flush=True)
        traceback.print_exc()
        raise
    finally:
        destroy_parallel_state(pstate)
    exit_rank()


def exit_rank() -> None:
    """End a spawned rank that has done its work and released its groups, with exit code 0 and without the
    interpreter's teardown.

    That teardown runs C++ destructors after the last Python frame, and in a process that used gloo they sometimes
    abort ("terminate called without an active exception", SIGABRT; about 1 run in 30 of a 4-rank group on two
    cores), which spawn reports as the rank's failure although its checks all passed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_group(fn: Callable[[ParallelState], None], sp: int, tp: int = 1, device_type: str = "cpu") -> None:
    """Call ``fn(pstate)`` on all ``sp * tp`` ranks; an exception on any rank fails the caller.

    ``fn`` must be a module-level function (it is pickled into the spawned processes); ``pstate.device`` is
    the rank's device (``cuda:rank`` with ``device_type="cuda"``).
    """
    mp.spawn(_entry, args=(fn, sp, tp, free_port(), device_type), nprocs=sp * tp, join=True)


# ---- benchmark smoke tests: a model directory at a shrunk real shape, one benchmark run -------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# CPU size; the architecture, its layer kinds and the rest of the shape's config are kept
BENCH_TINY = dict(hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=300, num_hidden_layers=2)


def tiny_model(tmp_path: Path, shape: str, **over) -> Path:
    """A directory holding only config.json: ``SHAPES[shape]`` shrunk by ``BENCH_TINY``, then ``over``."""
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**SHAPES[shape], **BENCH_TINY, **over}))
    return model


def run_bench(script: str, *args, out: Path, timeout: int = 300, cpu_only: bool = False,
              output: list[str] | None = None) -> list[dict]:
    """Run ``benchmarks/<script>`` with ``args`` and ``--out out``; the rows it wrote (its stdout and stderr are
    appended to ``output`` if given)."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", script), *map(str, args), "--out", str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if cpu_only else None
    r = subprocess.run(cmd, check=True, timeout=timeout, cwd=ROOT, env=env, capture_output=output is not None,
                       text=True)
    if output is not None:
        output += [r.stdout, r.stderr]
    return json.loads(out.read_text())["rows"]


# ---- servers: a real launch_server.py process, its processes, its answers --------------------------------------------
REPO = Path(ROOT)
READY_TIMEOUT_S = 300.0  # CI machines are small and shared; model load and process start-up vary a lot


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, grandchildren, ...), from /proc."""
    parent_of = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if fields[0] not in ("Z", "X"):
                parent_of[int(entry)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent_of.items() if pp == p]
        found += kids
        frontier += kids
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


class ServerProcess:
    """``python launch_server.py ARGS --port 0``; the port is read from the server's log."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "launch_server.py", "--port", "0", *args],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.url = ""

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if not self.url:
                m = re.search(r"listening on (http://[\d.]+:\d+)", self.log())
                self.url = m.group(1) if m else ""
            if self.url:
                try:
                    if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"server not healthy after {timeout} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in descendants(self.proc.pid):
                    os.kill(pid, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def start_server(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> ServerProcess:
    """``launch_server.py ARGS``, healthy; ``env`` is added to this process's environment."""
    return ServerProcess(args, log_path, env).wait_ready()


def openai_client(srv: ServerProcess):
    """The official SDK against ``srv``: no retries (a failure is the result), a generous timeout for CPU runs."""
    import openai

    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=120)


def prometheus_value(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def sse_events(raw: bytes) -> list[str]:
    """Split an SSE body into its ``data:`` payloads, asserting OpenAI's exact framing."""
    text = raw.decode()
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    blocks = text.split("\n\n")
    assert blocks[-1] == ""
    payloads = []
    for block in blocks[:-1]:
        assert block.startswith("data: ") and "\n" not in block, repr(block)
        payloads.append(block[len("data: "):])
    assert payloads.count("[DONE]") == 1
    return payloads[:-1]


def engine_pid(server_pid: int) -> int:
    """The engine process: the server's spawned child that leads its own process group."""
    [pid] = [p for p in descendants(server_pid) if os.getpgid(p) == p and b"spawn_main" in _cmdline(p)]
    return pid


def worker_pids(engine: int) -> list[int]:
    """Ranks 1..W-1: the engine's spawned children."""
    return sorted(p for p in descendants(engine) if b"spawn_main" in _cmdline(p))


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def wait_gone(pids: list[int], timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def kill_and_check_in_flight_requests_fail(srv: ServerProcess, victim: int) -> None:
    """With one streaming and one non-streaming request in flight, SIGKILL ``victim``: both get an error within
    seconds, /health turns 503 and stays there, new requests get 503; then SIGTERM leaves no process behind."""
    body = {"prompt": "The town sits " * 20, "max_tokens": 4000, "ignore_eos": True}
    blocking: dict[str, httpx.Response] = {}
    t = threading.Thread(target=lambda: blocking.setdefault(
        "r", httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)))
    t.start()
    tree = descendants(srv.proc.pid)
    with httpx.stream("POST", f"{srv.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
        while prometheus_value(httpx.get(f"{srv.url}/metrics").text, "server_requests_in_flight") < 2:
            time.sleep(0.05)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        rest = [line for line in lines if line]
    assert time.monotonic() - killed_at < 10
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2][len("data: "):])["error"]
    assert error["type"] == "server_error" and error["code"] == "engine_dead"
    t.join(timeout=10)
    assert blocking["r"].status_code == 500 and blocking["r"].json()["error"]["code"] == "engine_dead"
    for _ in range(2):
        health = httpx.get(f"{srv.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        again = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        assert again.status_code == 503 and again.json()["error"]["code"] == "engine_dead"
        time.sleep(0.5)
    assert srv.stop(signal.SIGTERM) == 0
    assert wait_gone(tree) == []


# ---- gated delta rules (GDN, KDA): the fp64 token loop per packed sequence --------------------------------------
def delta_rule_inputs(lens: list[int], seed: int, hk: int, hv: int, dk: int, dv: int, per_channel: bool,
                      decay: float, power: int):
    """Packed delta-rule inputs ``q, k, v, g, beta, cu_seqlens, s0``: raw q/k (normalised inside the ops), log
    decays ``g = -decay * U^power`` per head (GDN) or per key channel (KDA: ``[T, H, Dk]``), beta in (0, 1), and
    nonzero initial states of the magnitude a real prompt leaves."""
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    q, k = torch.randn(t, hk, dk, generator=g), torch.randn(t, hk, dk, generator=g)
    v = torch.randn(t, hv, dv, generator=g)
    log_decay = -decay * torch.rand(t, hv, *((dk,) if per_channel else ()), generator=g) ** power
    beta = torch.rand(t, hv, generator=g)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    s0 = torch.randn(len(lens), hv, dk, dv, generator=g) * 0.5
    return q, k, v, log_decay, beta, cu, s0


def delta_rule_truth(q, k, v, g, beta, cu, s0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sequence of the packed inputs (``cu``: offsets), the fp64 recurrence's output and final state."""
    from server.kernels.gdn_ref import gdn_recurrence_fp64

    b = cu.tolist()
    return [gdn_recurrence_fp64(q[s:e], k[s:e], v[s:e], g[s:e], beta[s:e], s0[i])
            for i, (s, e) in enumerate(zip(b[:-1], b[1:]))]
