"""Sparse mixture of experts with TP-sharded experts, routed by a router of :mod:`server.layers.moe_routing`
(top-k softmax renormalized, as MiniMax/Mixtral, unless given), optionally beside a shared expert, sigmoid-gated
(Qwen3-Next, Qwen3.5-MoE) or plain (GLM-4.5).

Every TP rank holds each expert's slice of the intermediate dimension (gate/up column-split, down row-split),
so a token's expert output is a partial sum that the caller's row reduction completes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.kernels import ops
from server.layers.linear import as_tensor, copy_into, divide
from server.layers.moe_routing import Router, make_router
from server.sp.groups import ParallelState

# On CUDA a step of at most this many tokens runs the sync-free forms even outside a CUDA graph. The dense form
# computes every expert for every token: E / top_k times the FLOPs of the routed ones, but each expert's weights are
# read once either way, and at T tokens the extra FLOPs take T * bandwidth / matmul rate of a weight read (about
# T / 180 on an H200), so up to 128 tokens they cost less than the weights they share. The per-expert loop instead
# launches about six kernels per expert that has tokens and waits for the device once per layer: with 64 or 512
# experts that is thousands of launches for a short prompt or a question over a cached prefix.
SYNC_FREE_MAX_TOKENS = 128


class FusedMoE(nn.Module):
    """x ``[T, hidden]`` -> partial ``[T, hidden]`` (sum over TP = the MoE output).

    Weights: ``w13 [E, 2*I/tp, hidden]`` (gate rows then up rows), ``w2 [E, hidden, I/tp]``; router ``[E, hidden]``
    replicated; with ``correction_bias``, the router's ``e_score_correction_bias [E]`` (fp32, replicated).
    """

    def __init__(self, num_experts: int, top_k: int, hidden: int, intermediate: int, pstate: ParallelState,
                 dtype: torch.dtype | None = None, router: Router | None = None, correction_bias: bool = False):
        super().__init__()
        self.pstate = pstate
        self.num_experts = num_experts
        self.top_k = top_k
        self.router = router or make_router("softmax", top_k)
        # fp32 whatever the model dtype: a bias of ~1e-3 steers selection between scores a few 1e-3 apart
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32),
                                                    requires_grad=False) if correction_bias else None
        self.inter = divide(intermediate, pstate.tp_size, "the MoE intermediate size")
        self.gate = nn.Parameter(torch.empty(num_experts, hidden, dtype=dtype), requires_grad=False)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.inter, hidden, dtype=dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, self.inter, dtype=dtype), requires_grad=False)
        self.w13.weight_loader = self.w13_loader
        self.w2.weight_loader = self.w2_loader

    def w13_loader(self, param: nn.Parameter, loaded, shard_id: tuple[int, int]) -> None:
        expert, part = shard_id  # part 0 = gate (w1), 1 = up (w3)
        s = self.pstate.tp_rank * self.inter
        dst = param.data[expert, part * self.inter : (part + 1) * self.inter]
        copy_into(dst, as_tensor(loaded[s : s + self.inter]), f"expert {expert} gate/up")

    def w2_loader(self, param: nn.Parameter, loaded, shard_id: int) -> None:
        s = self.pstate.tp_rank * self.inter
        copy_into(param.data[shard_id], as_tensor(loaded[:, s : s + self.inter]), f"expert {shard_id} down")

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.router(F.linear(x, self.gate).float(), self.e_score_correction_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        # a CUDA graph (no host sync, static shapes), or few tokens (see SYNC_FREE_MAX_TOKENS)
        if x.is_cuda and (torch.cuda.is_current_stream_capturing() or x.shape[0] <= SYNC_FREE_MAX_TOKENS):
            return self.forward_sync_free(x, weights, experts)
        out = torch.zeros_like(x)
        flat = experts.view(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token_of = order // self.top_k
        w_of = weights.view(-1)[order]
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            idx = token_of[start : start + c]
            h = ops.silu_and_mul(F.linear(x[idx], self.w13[e]))
            y = F.linear(h, self.w2[e]) * w_of[start : start + c].unsqueeze(-1).to(x.dtype)
            out.index_add_(0, idx, y)
            start += c
        return out


    def forward_sync_free(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The same result without a host sync (decode steps captured in CUDA graphs). Few tokens (fewer
        (token, expert) pairs than experts) run their experts' weights gathered per pair; more run every expert on
        every token, weighted by the routing (zero for the experts a token does not use): decode reads every
        expert's weights once either way."""
        t = x.shape[0]
        if t * self.top_k < self.num_experts:
            h = torch.bmm(self.w13[experts.flatten()], x.repeat_interleave(self.top_k, 0).unsqueeze(-1))
            h = ops.silu_and_mul(h.squeeze(-1)).unsqueeze(-1)
            y = torch.bmm(self.w2[experts.flatten()], h).view(t, self.top_k, -1)
            return (y * weights.unsqueeze(-1).to(x.dtype)).sum(1)
        gate = torch.zeros(t, self.num_experts, dtype=x.dtype, device=x.device)
        gate.scatter_(1, experts, weights.to(x.dtype))
        e, hidden = self.num_experts, x.shape[1]
        # every expert on every token as plain matmuls over views of the weights: an einsum over (e, i) would
        # permute w2 to [hidden, E * I] first, a copy of every expert's down weights per layer per step
        h = ops.silu_and_mul(F.linear(x, self.w13.view(-1, hidden)).view(t, e, -1))  # [T, E, I]
        h = (h * gate.unsqueeze(-1)).transpose(0, 1)  # [E, T, I], the routing weight (0 if unused) applied
        return torch.bmm(h, self.w2.transpose(1, 2)).sum(0)  # [E, T, hidden] -> [T, hidden]


class SharedExpertMoE(nn.Module):
    """Routed experts plus an always-on shared expert, scaled by ``sigmoid(x w_gate)`` when ``gated``: x
    ``[T, hidden]`` -> partial ``[T, hidden]`` (sum over TP = the output). The gate is a per-token scalar,
    replicated, so it can scale each rank's partial shared-expert sum before the one reduction the caller does for
    both. ``router`` and ``correction_bias`` are :class:`FusedMoE`'s."""

    def __init__(self, num_experts: int, top_k: int, hidden: int, intermediate: int, shared_intermediate: int,
                 pstate: ParallelState, dtype: torch.dtype | None = None, router: Router | None = None,
                 correction_bias: bool = False, gated: bool = True):
        super().__init__()
        self.experts = FusedMoE(num_experts, top_k, hidden, intermediate, pstate, dtype, router, correction_bias)
        self.shared_inter = divide(shared_intermediate, pstate.tp_size, "the shared expert intermediate size")
        self.shared_w13 = nn.Parameter(torch.empty(2 * self.shared_inter, hidden, dtype=dtype), requires_grad=False)
        self.shared_w2 = nn.Parameter(torch.empty(hidden, self.shared_inter, dtype=dtype), requires_grad=False)
        self.shared_gate = nn.Parameter(torch.empty(1, hidden, dtype=dtype), requires_grad=False) if gated else None
        self.pstate = pstate
        self.shared_w13.weight_loader = self.shared_w13_loader
        self.shared_w2.weight_loader = self.shared_w2_loader

    def shared_w13_loader(self, param: nn.Parameter, loaded, shard_id: int) -> None:
        n, s = self.shared_inter, self.pstate.tp_rank * self.shared_inter
        copy_into(param.data[shard_id * n : (shard_id + 1) * n], as_tensor(loaded[s : s + n]),
                  "the shared expert gate/up")

    def shared_w2_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        s = self.pstate.tp_rank * self.shared_inter
        copy_into(param, as_tensor(loaded[:, s : s + self.shared_inter]), "the shared expert down")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.shared_w13)
        shared = F.linear(ops.silu_and_mul(h), self.shared_w2)
        if self.shared_gate is not None:
            shared = torch.sigmoid(F.linear(x, self.shared_gate)) * shared
        return self.experts(x) + shared
