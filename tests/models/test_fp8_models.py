"""FP8 checkpoints (block-scaled ``quant_method: fp8``, compressed-tensors per-channel / per-tensor) and
``--quantization fp8`` vs ``transformers`` (fp32) running the dequantized weights, on CPU.

The checkpoints are the tiny random ones of tests/helpers.py with their projection and expert weights quantized to
``float8_e4m3fn``: blocks smaller than 128 (32 x 16: several per weight, uneven last row blocks of 48-row k/v
projections; 24 x 40: uneven last column blocks) and one layer left in high precision (``modules_to_not_convert``
/ ``ignore``); MoE cases MiniMax (all parallel layouts), Qwen3.5-MoE (one rank), and Qwen3-MoE where the server has
it. The engine keeps the linear weights in FP8 with their scales and computes in fp32 on the dequantized
weight, so logits agree to fp32 tolerance and greedy tokens are identical. Parallel runs (sp x tp) must give the
same; a TP shard that would cut a scale block is refused at start-up naming ``--tp-size``.
"""

from __future__ import annotations

import pytest
import torch

from server import LLM, SamplingParams
from server.kernels.fp8 import FP8
from server.models.loader import MODEL_CLASSES
from tests.helpers import assert_logits_close, hf_model, prompt, save_fp8_model, save_tiny_model, tiny_config

LONG = prompt(77)
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
# sp_min_tokens 8 < chunk 50: chunks of LONG are split over SP (ring attention over an SP-sharded prefix)
PARALLEL = dict(device="cpu", sp_min_tokens=8, chunked_prefill_size=50, page_size=8)


def moe_archs() -> list[str]:
    """MiniMax (MoE + lightning), and Qwen3-MoE once the helpers and the server know it."""
    archs = ["minimax_alt"]
    try:
        tiny_config("qwen3_moe")
        if "Qwen3MoeForCausalLM" in MODEL_CLASSES:
            archs.append("qwen3_moe")
    except (ValueError, AttributeError):
        pass
    return archs


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fp8"))


def reference(path: str, ids: list[int]) -> tuple[torch.Tensor, list[int]]:
    """transformers' fp32 prompt logits and 16 greedy tokens."""
    ref = hf_model(path)
    with torch.no_grad():
        logits = ref(torch.tensor([ids])).logits[0]
        gen = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):]
    return logits, gen.tolist()


def check(llm: LLM, ref: tuple[torch.Tensor, list[int]], ids: list[int]) -> None:
    assert_logits_close(llm.engine.prompt_logits(ids), ref[0])
    assert llm.generate([ids], GREEDY)[0].token_ids == ref[1]


# Qwen3.5-MoE: FP8 experts (kept FP8, with a shared expert) and Gated DeltaNet projections (dequantized at load)
CASES = [("llama", "block", (32, 16)), ("llama", "block", (24, 40)), ("llama", "channel", (1, 1)),
         ("llama", "tensor", (1, 1)), ("qwen3_5_moe", "block", (32, 16))]
CASES += [(a, "block", (32, 16)) for a in moe_archs()]


@pytest.mark.parametrize("arch,scheme,block", CASES)
def test_fp8_checkpoint_matches_transformers_on_dequantized_weights(root, arch, scheme, block):
    keep = ("layers.0.mlp.down_proj",) if arch == "llama" else ()
    fp8, dequantized = save_fp8_model(arch, root, scheme, block, keep=keep)
    with LLM(fp8, device="cpu") as llm:
        check(llm, reference(dequantized, LONG), LONG)
        layers = llm.engine.runner.model.layers
    if arch == "llama":  # FP8 as stored, the layer the checkpoint left alone in fp32
        assert layers[1].self_attn.qkv_proj.weight.dtype == FP8 and layers[1].mlp.down_proj.weight.dtype == FP8
        assert layers[0].mlp.down_proj.weight.dtype == torch.float32


def test_online_fp8_matches_transformers_on_per_channel_quantized_weights(root):
    """``--quantization fp8`` on an fp32 checkpoint quantizes each weight row to FP8 at load: the same weights as a
    per-channel FP8 checkpoint made from it."""
    _, dequantized = save_fp8_model("llama", root, "channel")
    with LLM(save_tiny_model("llama", root), device="cpu", quantization="fp8") as llm:
        check(llm, reference(dequantized, LONG), LONG)


@pytest.mark.slow
@pytest.mark.parametrize("arch,scheme", [("llama", "block"), ("llama", "channel")] +
                         [(a, "block") for a in moe_archs()])
@pytest.mark.parametrize("sp,tp", [(2, 2), (4, 2)])
def test_fp8_checkpoint_sp_tp_matches_transformers(root, arch, scheme, sp, tp):
    if scheme == "channel" and sp == 4:
        pytest.skip("per-channel scales: one sp x tp run covers their TP slicing")
    fp8, dequantized = save_fp8_model(arch, root, scheme, (32, 16) if scheme == "block" else (1, 1))
    with LLM(fp8, sp_size=sp, tp_size=tp, **PARALLEL) as llm:
        check(llm, reference(dequantized, LONG), LONG)


def test_tp_shard_that_cuts_a_scale_block_is_refused(root):
    """Blocks of 32 input columns: at tp = 2 the 96-column o_proj / down_proj shards hold 48 columns each."""
    fp8, _ = save_fp8_model("llama", root, "block", (32, 32))
    with pytest.raises(ValueError, match=r"--tp-size 2 gives .*48 input columns per rank.*blocks of 32 columns"):
        LLM(fp8, device="cpu", tp_size=2)


def test_fp8_flags_reach_the_engine_config_and_unsupported_checkpoints_stop_at_start(root):
    import json
    import os

    from server.entrypoints.args import parse_server_args

    engine = parse_server_args(["--quantization", "fp8", "--kv-cache-dtype", "fp8_e4m3"]).engine
    assert (engine.quantization, engine.kv_cache_dtype) == ("fp8", "fp8_e4m3")
    fp8, _ = save_fp8_model("llama", root, "channel")
    with open(os.path.join(fp8, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    awq = os.path.join(root, "awq")
    os.makedirs(awq)
    with open(os.path.join(awq, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="quant_method 'awq' is not supported"):
        parse_server_args(["--model-path", awq]).validate()
