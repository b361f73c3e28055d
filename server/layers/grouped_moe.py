"""DeepSeek-V3-style mixture of experts: grouped sigmoid routing with a score-correction bias, routed experts scaled
by ``routed_scaling_factor``, plus always-on shared experts (DeepSeek-V3, Kimi-K2, Moonlight, Kimi-Linear).

Routing per token (``noaux_tc``): ``s = sigmoid(x W_gate^T)`` in fp32; experts are chosen on ``s + bias``: the
experts are cut into ``n_group`` groups, each group scores the sum of its two best biased scores, the best
``topk_group`` groups stay, and the ``top_k`` best biased scores among their experts are chosen. The weights are
the unbiased ``s`` of the chosen experts, renormalised (``norm_topk_prob``) and times ``routed_scaling_factor``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.layers.moe import FusedMoE
from server.models.common import GatedMLP
from server.sp.groups import ParallelState


class GroupedTopkMoE(FusedMoE):
    """:class:`FusedMoE` routed by grouped sigmoid top-k (module docstring); the bias ``e_score_correction_bias
    [E]`` is a checkpoint tensor."""

    def __init__(self, num_experts: int, top_k: int, hidden: int, intermediate: int, n_group: int, topk_group: int,
                 routed_scaling_factor: float, pstate: ParallelState, dtype: torch.dtype, renormalize: bool = True):
        super().__init__(num_experts, top_k, hidden, intermediate, pstate, dtype, renormalize)
        if num_experts % n_group or num_experts // n_group < 2:
            raise ValueError(f"n_group ({n_group}) must split the {num_experts} routed experts into groups of >= 2")
        self.n_group, self.topk_group, self.scaling = n_group, topk_group, routed_scaling_factor
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32),
                                                    requires_grad=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.sigmoid(F.linear(x.float(), self.gate.float()))
        choice = scores + self.e_score_correction_bias
        t = x.shape[0]
        groups = choice.view(t, self.n_group, -1)
        group_scores = groups.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
        choice = groups.masked_fill(~keep.unsqueeze(-1), -torch.inf).view(t, -1)
        experts = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, experts)
        if self.renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, experts


class SharedExpertsMoE(nn.Module):
    """Routed experts (:class:`GroupedTopkMoE`) plus ungated shared experts (one SwiGLU MLP of
    ``shared_intermediate``): x ``[T, hidden]`` -> ``[T, hidden]``, reduced over TP (sequence-sharded in and out when
    ``seq_sharded``)."""

    def __init__(self, experts: GroupedTopkMoE, hidden: int, shared_intermediate: int, pstate: ParallelState,
                 dtype: torch.dtype):
        super().__init__()
        self.pstate = pstate
        self.experts = experts
        self.shared_experts = GatedMLP(hidden, shared_intermediate, pstate, dtype)

    def forward(self, x: torch.Tensor, seq_sharded: bool, sp_split: bool = False) -> torch.Tensor:
        if sp_split:  # CausalLM.sp_split_mlp_ok is False for models with MoE layers
            raise ValueError("the SP-split MLP is for dense MLPs")
        shared = self.shared_experts(x, seq_sharded)
        if seq_sharded:
            return shared + self.pstate.tp_reduce_scatter(self.experts(self.pstate.tp_all_gather(x, dim=0)))
        return shared + self.pstate.tp_all_reduce(self.experts(x))
