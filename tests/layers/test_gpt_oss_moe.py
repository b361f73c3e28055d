"""gpt-oss's MoE layer against transformers' GptOssMLP (fp32, random weights incl. biases, activations large enough
to reach the SwiGLU clamp): the grouped GEMMs, the host-synced expert loop and both sync-free forms (per-pair gathered
experts for few tokens, every expert for more), and the TP split (two ranks' partial sums)."""

from __future__ import annotations

import pytest
import torch

from server.layers.gpt_oss_moe import GptOssMoE
from server.layers.moe import grouped_gemms
from server.sp.groups import ParallelState
from tests.helpers import FP32_TOL, tiny_config


@pytest.mark.parametrize("tokens", [1, 2, 40])  # 1, 2: fewer (token, expert) pairs than the 5 experts
def test_moe_matches_transformers(tokens):
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    cfg = tiny_config("gpt_oss")
    torch.manual_seed(0)
    ref = GptOssMLP(cfg).eval()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(tokens, cfg.hidden_size) * 2
    with torch.no_grad():
        want, _ = ref(x[None])
    state = {n: t.detach() for n, t in ref.named_parameters()}
    total = torch.zeros_like(x)
    for tp_rank in range(2):
        moe = GptOssMoE(cfg.num_local_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.intermediate_size,
                        ParallelState(tp_size=2, tp_rank=tp_rank), torch.float32, cfg.swiglu_alpha, cfg.swiglu_limit)
        moe.gate.data.copy_(state["router.weight"])
        moe.router_bias.data.copy_(state["router.bias"])
        moe.w13.weight_loader(moe.w13, state["experts.gate_up_proj"].transpose(1, 2))
        moe.b13.weight_loader(moe.b13, state["experts.gate_up_proj_bias"])
        moe.w2.weight_loader(moe.w2, state["experts.down_proj"].transpose(1, 2))
        moe.b2.weight_loader(moe.b2, state["experts.down_proj_bias"])
        with torch.no_grad():
            weights, experts = moe.route(x)
            grouped = moe.forward_grouped(x, weights, experts)  # what moe(x) runs on CPU fp32
            with grouped_gemms(False):
                torch.testing.assert_close(moe(x), grouped, **FP32_TOL)  # the per-expert loop
                torch.testing.assert_close(moe.forward_sync_free(x, weights, experts), grouped, **FP32_TOL)
        total += grouped
    torch.testing.assert_close(total, want[0], **FP32_TOL)
