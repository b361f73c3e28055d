"""FP8 MoE checkpoints keep their experts in FP8: a tiny Qwen3-MoE with FP8 experts (block-scaled in blocks of
32 x 16, uneven last row and column blocks; compressed-tensors per-channel; ``--quantization fp8`` on the fp32
checkpoint) gives the greedy tokens and prompt logits of ``transformers`` (fp32) on the dequantized weights, at
sp x tp = 1 x 1 and 2 x 2 (TP-sliced experts: each rank's 12 down-projection columns cut the 16-column blocks) and
with expert parallelism; the experts are float8 in the loaded model and take about half the bytes of bf16 experts.
"""

from __future__ import annotations

import pytest
import torch

from server import LLM
from server.kernels.fp8 import FP8
from tests.helpers import save_fp8_model, save_tiny_model
from tests.models.test_fp8_models import LONG, PARALLEL, check, reference


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fp8_moe"))


def expert_bytes(model) -> tuple[int, int]:
    """(bytes of every MoE layer's expert weights and scales, their weight count)."""
    moes = model.moe_layers()
    params = [p for m in moes for n, p in m.named_parameters() if n.startswith(("w13", "w2"))]
    return sum(p.numel() * p.element_size() for p in params), sum(m.w13.numel() + m.w2.numel() for m in moes)


@pytest.mark.parametrize("scheme,block", [("block", (32, 16)), ("channel", (1, 1))])
def test_fp8_experts_match_transformers_on_dequantized_weights(root, scheme, block):
    fp8, dequantized = save_fp8_model("qwen3_moe", root, scheme, block)
    ref = reference(dequantized, LONG)
    with LLM(fp8, device="cpu") as llm:
        check(llm, ref, LONG)
        moe = llm.engine.runner.model.moe_layers()[0]
        assert moe.w13.dtype == moe.w2.dtype == FP8
        assert moe.w13_scale.dtype == moe.w2_scale.dtype == torch.float32
        assert moe.w13_scale.shape[-1] == (64 // 16 if scheme == "block" else 1)
    if scheme == "channel":  # --quantization fp8 quantizes each expert row as the per-channel checkpoint stores it
        with LLM(save_tiny_model("qwen3_moe", root), device="cpu", quantization="fp8") as llm:
            assert llm.engine.runner.model.moe_layers()[0].w2.dtype == FP8
            check(llm, ref, LONG)


def test_fp8_experts_take_about_half_the_bytes_of_bf16_experts(tmp_path):
    """The same FP8 checkpoint with its experts left in high precision (``modules_to_not_convert``) loads them as
    bf16: the FP8 experts take half their bytes plus 4 bytes of scale per row and block, and the rank's weight bytes
    (ModelRunner.footprint) drop by that difference."""
    # blocks of 128 x 128, as published (its own directory: the tiny checkpoints are saved once per name)
    over, root = dict(hidden_size=128, moe_intermediate_size=128), str(tmp_path)
    fp8, _ = save_fp8_model("qwen3_moe", root, "block", (128, 128), **over)
    bf16_experts, _ = save_fp8_model("qwen3_moe", root, "block", (128, 128), keep=(".experts.",), **over)
    loads = {}
    for name, path in (("fp8", fp8), ("bf16", bf16_experts)):
        with LLM(path, device="cpu", dtype="bfloat16") as llm:
            runner = llm.engine.runner
            loads[name] = (runner.footprint()["weight_bytes"], *expert_bytes(runner.model))
    (total8, experts8, n), (total16, experts16, _) = loads["fp8"], loads["bf16"]
    assert experts16 == 2 * n
    assert n <= experts8 <= 1.05 * n  # one byte per weight, and a scale per 128 columns
    assert total16 - total8 == experts16 - experts8


@pytest.mark.parametrize("sp,tp,ep", [(2, 2, False), (1, 2, True)])
def test_fp8_experts_sp_tp_and_expert_parallel_match_transformers(root, sp, tp, ep):
    """With expert parallelism, decode steps take the graph form (``cuda_graph="eager"``: padded, not captured), so
    the experts' sync-free form runs the grouped FP8 kernels (interpreted) on every rank."""
    fp8, dequantized = save_fp8_model("qwen3_moe", root, "block", (32, 16))
    graphs = dict(cuda_graph="eager", cuda_graph_max_bs=2) if ep else {}
    with LLM(fp8, sp_size=sp, tp_size=tp, enable_expert_parallel=ep, **PARALLEL, **graphs) as llm:
        check(llm, reference(dequantized, LONG), LONG)
        ranks = llm.engine.memory_stats(reset=False)
        assert not ep or llm.engine.runner.graphs.steps > 0
    if ep:  # every expert on exactly one rank
        assert sorted(e for m in ranks for e in range(*m["experts"])) == list(range(6))
