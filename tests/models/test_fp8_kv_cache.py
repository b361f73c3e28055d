"""FP8 KV cache (``kv_cache_dtype="fp8_e4m3"``) vs ``transformers`` (fp32) with K and V rounded to e4m3 the same way
(scale 1.0: the tiny checkpoints give no ``k_scale`` / ``v_scale``; one test adds per-layer scales to a checkpoint),
registered as a transformers attention function.

The engine stores FP8 pages and dequantizes where it reads them (local batches, the SP ring's received blocks, the
all-gather-KV mode); attention to a step's own rows sees the rounded values too, so every read agrees with the
reference: identical greedy tokens at sp 1 and 2 (ring and all-gather KV), prefix-cache hits on FP8 pages included,
and half the bytes per page. Linear-attention states stay fp32 (the hybrid MiniMax case).
"""

from __future__ import annotations

import pytest
import torch

from server import LLM, SamplingParams
from server.kernels.fp8 import FP8
from tests.helpers import assert_logits_close, prompt, save_tiny_model

LONG = prompt(77)
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
ENGINE = dict(device="cpu", sp_min_tokens=8, chunked_prefill_size=50, page_size=8, kv_cache_dtype="fp8_e4m3")


def fp8_kv_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention on K and V rounded to FP8 (e4m3, scale 1)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def rounded(x):
        return x.clamp(-448, 448).to(torch.float8_e4m3fn).to(x.dtype)

    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, rounded(key), rounded(value), attention_mask, **kwargs)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Per architecture: (checkpoint, prompt logits and 16 greedy tokens of transformers with FP8-rounded K/V)."""
    import transformers as tf

    tf.AttentionInterface.register("fp8_kv_test", fp8_kv_attention)
    root = str(tmp_path_factory.mktemp("kv"))
    out = {}
    for arch in ("llama", "minimax_alt"):
        path = save_tiny_model(arch, root)
        ref = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                      attn_implementation="fp8_kv_test").eval()
        with torch.no_grad():
            logits = ref(torch.tensor([LONG])).logits[0]
            gen = ref.generate(torch.tensor([LONG]), attention_mask=torch.ones(1, len(LONG), dtype=torch.long),
                               max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
        out[arch] = (path, logits, gen[0, len(LONG):].tolist())
    return out


@pytest.mark.parametrize("arch", ["llama", "minimax_alt"])
def test_fp8_kv_cache_matches_reference_with_rounded_kv(references, arch):
    path, logits, tokens = references[arch]
    with LLM(path, **ENGINE) as llm:
        assert_logits_close(llm.engine.prompt_logits(LONG), logits)
        assert llm.generate([LONG], GREEDY)[0].token_ids == tokens
        hit = llm.generate([LONG], GREEDY)[0]  # the prompt's FP8 pages, kept by the prefix cache
        assert hit.cached_tokens > 0 and hit.token_ids == tokens
        runner = llm.engine.runner
        caches = [layer.cache for layer, spec in runner.cache_layers if spec.paged]
        assert caches and all(c.k.dtype == FP8 and c.v.dtype == FP8 for c in caches)
        states = [layer.cache for layer, spec in runner.cache_layers if not spec.paged]
        assert all(t.dtype == torch.float32 for s in states for t in vars(s).values() if isinstance(t, torch.Tensor))
        fp8_page = runner.cache_bytes_per_page()
    with LLM(path, **{**ENGINE, "kv_cache_dtype": "auto"}) as llm:
        assert llm.engine.runner.cache_bytes_per_page() == 4 * fp8_page  # fp32 pages on CPU: 4 bytes per value


@pytest.mark.slow
@pytest.mark.parametrize("ring_mode", ["ring", "allgather"])
def test_fp8_kv_cache_at_sp2_matches_reference(references, ring_mode):
    """The long prompt's chunks are split over 2 SP ranks: later chunks attend to the other rank's FP8 pages,
    passed by the ring (or all-gathered) as FP8 bytes."""
    path, logits, tokens = references["llama"]
    with LLM(path, sp_size=2, ring_mode=ring_mode, **ENGINE) as llm:
        assert_logits_close(llm.engine.prompt_logits(LONG), logits)
        assert llm.generate([LONG], GREEDY)[0].token_ids == tokens


# per layer (k_scale, v_scale): small ones move K/V up the e4m3 range (some saturate at 448), large ones down
SCALES = [(0.02, 0.05), (0.5, 3.0)]


def test_checkpoint_kv_scales_are_applied(references, tmp_path):
    """A checkpoint's ``k_scale`` / ``v_scale`` (as FP8 quantizers write them, one per attention layer): pages hold
    ``k / k_scale`` rounded to e4m3, reads multiply back; the reference rounds transformers' K/V the same way with
    each layer's own scales, and differs from the scale-1 reference, so ignoring the scales fails."""
    import transformers as tf
    from safetensors.torch import load_file, save_file

    path = save_tiny_model("llama", str(tmp_path))  # the same weights as the scale-1 reference's llama
    weights = load_file(f"{path}/model.safetensors")
    for i, (ks, vs) in enumerate(SCALES):
        weights[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(ks)
        weights[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(vs)
    save_file(weights, f"{path}/model.safetensors", metadata={"format": "pt"})

    def scaled_attention(module, query, key, value, attention_mask, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        ks, vs = SCALES[module.layer_idx]

        def rounded(x, s):
            return (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).to(x.dtype) * s

        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, rounded(key, ks), rounded(value, vs), attention_mask,
                                               **kwargs)

    tf.AttentionInterface.register("fp8_kv_scaled_test", scaled_attention)
    ref = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                  attn_implementation="fp8_kv_scaled_test").eval()
    with torch.no_grad():
        logits = ref(torch.tensor([LONG])).logits[0]
        tokens = ref.generate(torch.tensor([LONG]), attention_mask=torch.ones(1, len(LONG), dtype=torch.long),
                              max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(LONG):]
    assert (logits - references["llama"][1]).abs().max() > 1e-2  # the scales change the rounding
    with LLM(path, **ENGINE) as llm:
        layers = [layer for layer, spec in llm.engine.runner.cache_layers if spec.paged]
        assert [(layer.k_scale, layer.v_scale) for layer in layers] == [pytest.approx(s, rel=1e-6) for s in SCALES]
        assert_logits_close(llm.engine.prompt_logits(LONG), logits)
        assert llm.generate([LONG], GREEDY)[0].token_ids == tokens.tolist()
