"""Every router of server.layers.moe_routing against the transformers router it implements (same logits, same
weights and bias): the same experts and the same weights. Also the all-heads q/k RMSNorm of MiniMax-M2 under TP,
with KV heads replicated over TP ranks, against transformers' unsharded norm."""

from __future__ import annotations

import pytest
import torch

from server.layers.moe_routing import make_router
from server.layers.norm import TPRMSNorm
from tests.sp.sp_testing import run_on_group

HIDDEN, TOKENS = 32, 300


def hf_router(kind: str, experts: int, top_k: int, **cfg):
    """A transformers router module with random weights (and a random correction bias where it has one)."""
    import transformers as tf
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter
    from transformers.models.minimax_m2.modeling_minimax_m2 import MiniMaxM2TopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    common = dict(hidden_size=HIDDEN, num_experts_per_tok=top_k)
    if kind == "qwen3_moe":
        router = Qwen3MoeTopKRouter(tf.Qwen3MoeConfig(**common, num_experts=experts, **cfg))
    elif kind == "minimax_m2":
        router = MiniMaxM2TopKRouter(tf.MiniMaxM2Config(**common, num_local_experts=experts))
    else:
        router = Glm4MoeTopkRouter(tf.Glm4MoeConfig(**common, n_routed_experts=experts, **cfg))
    router.weight.data.normal_(0, 0.3)
    return router


CASES = [  # (transformers router, experts, top_k, its config, our router's arguments)
    ("qwen3_moe", 6, 2, dict(norm_topk_prob=True), dict(scoring="softmax")),
    ("qwen3_moe", 7, 3, dict(norm_topk_prob=False), dict(scoring="softmax", renormalize=False)),
    ("minimax_m2", 6, 2, {}, dict(scoring="sigmoid")),
    ("glm4_moe", 6, 2, dict(n_group=1, topk_group=1, routed_scaling_factor=2.5),
     dict(scoring="sigmoid", scaling=2.5)),
    ("glm4_moe", 12, 3, dict(n_group=4, topk_group=2, routed_scaling_factor=1.8),
     dict(scoring="sigmoid", scaling=1.8, n_group=4, topk_group=2)),
    ("glm4_moe", 8, 4, dict(n_group=2, topk_group=1, norm_topk_prob=False),
     dict(scoring="sigmoid", n_group=2, topk_group=1, renormalize=False)),
]


@pytest.mark.parametrize("kind,experts,top_k,hf_cfg,ours", CASES)
def test_router_matches_transformers(kind, experts, top_k, hf_cfg, ours) -> None:
    torch.manual_seed(experts * 10 + top_k)
    ref = hf_router(kind, experts, top_k, **hf_cfg)
    x = torch.randn(TOKENS, HIDDEN)
    bias = None
    if kind != "qwen3_moe":
        bias = torch.randn(experts) * 0.1  # large enough to change the choice for many tokens
    with torch.no_grad():
        if kind == "glm4_moe":
            ref.e_score_correction_bias.copy_(bias)
            logits, want_w, want_e = ref(x)
        elif kind == "minimax_m2":
            logits, want_w, want_e = ref(x, bias)
        else:
            logits, want_w, want_e = ref(x)
    weights, chosen = make_router(top_k=top_k, **ours)(logits.float(), bias)
    # top-k order is not part of the contract (the reference asks for unsorted results): compare as sets
    order, want_order = chosen.argsort(-1), want_e.argsort(-1)
    assert torch.equal(chosen.gather(1, order), want_e.gather(1, want_order))
    torch.testing.assert_close(weights.gather(1, order), want_w.float().gather(1, want_order), rtol=1e-6, atol=1e-7)
    if bias is not None:  # the bias matters for this data: without it other experts would be chosen
        _, unbiased = make_router(top_k=top_k, **ours)(logits.float(), None)
        assert not torch.equal(unbiased.sort(-1).values, chosen.sort(-1).values)


def test_unknown_scoring_and_bad_groups_are_rejected() -> None:
    with pytest.raises(ValueError, match="softmax, sigmoid"):
        make_router("sparsemax", 2)
    with pytest.raises(ValueError, match="topk_group"):
        make_router("sigmoid", 2, n_group=2, topk_group=3)
    with pytest.raises(ValueError, match="softmax routing"):
        make_router("softmax", 2, scaling=2.5)




def _all_heads_norm_on_rank(pstate) -> None:
    from transformers.models.minimax_m2.modeling_minimax_m2 import MiniMaxM2RMSNorm

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 2 * 24, generator=g), torch.rand(2 * 24, generator=g) + 0.5
    ref = MiniMaxM2RMSNorm(2 * 24, 1e-5)
    ref.weight.data.copy_(w)
    want = ref(x)
    replicas = pstate.tp_size // 2
    norm = TPRMSNorm(2 * 24, 1e-5, pstate, replicas=replicas)
    norm.weight.weight_loader(norm.weight, w)
    head = pstate.tp_rank // replicas  # the KV head this rank holds (QKVParallelLinear's choice)
    got = norm(x[:, head * 24 : (head + 1) * 24])
    torch.testing.assert_close(got, want[:, head * 24 : (head + 1) * 24], rtol=1e-6, atol=1e-6)


def test_all_heads_norm_with_replicated_kv_heads_matches_transformers() -> None:
    run_on_group(_all_heads_norm_on_rank, sp=1, tp=4)
