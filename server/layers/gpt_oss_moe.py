"""gpt-oss's sparse MLP: a router with bias, softmax over the top-k logits, and experts with biases and a clamped
SwiGLU, TP-sharded like :class:`server.layers.moe.FusedMoE`.

Per expert (as transformers' reference computes it): ``h = W13 x + b13``; gate and up are the even and odd columns
of the checkpoint's fused ``gate_up_proj`` (interleaved); ``gate = min(gate, limit)``, ``up = clamp(up, -limit,
limit)``, ``a = (up + 1) * gate * sigmoid(alpha * gate)``; ``y = W2 a + b2``. Every TP rank holds each expert's
slice of the intermediate (gate/up rows de-interleaved at load into ``[gate_r; up_r]``, down columns), so a
token's output is a partial sum the caller reduces; the down bias is added by TP rank 0 only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.layers.linear import as_tensor, copy_into, divide
from server.sp.groups import ParallelState

SYNC_FREE_MAX_TOKENS = 128  # as server.layers.moe: on CUDA, few tokens run every expert rather than a host-synced loop


class GptOssMoE(nn.Module):
    """x ``[T, hidden]`` -> partial ``[T, hidden]`` (sum over TP = the MoE output). ``w13 [E, 2 I/tp, hidden]``
    (gate rows, then up rows), ``b13 [E, 2 I/tp]``, ``w2 [E, hidden, I/tp]``, ``b2 [E, hidden]``; router ``[E,
    hidden]`` + bias, replicated."""

    def __init__(self, num_experts: int, top_k: int, hidden: int, intermediate: int, pstate: ParallelState,
                 dtype: torch.dtype | None, alpha: float, limit: float):
        super().__init__()
        self.pstate, self.num_experts, self.top_k, self.alpha, self.limit = pstate, num_experts, top_k, alpha, limit
        self.inter = divide(intermediate, pstate.tp_size, "the MoE intermediate size")
        e, i = num_experts, self.inter

        def param(*shape: int, loader=None) -> nn.Parameter:
            p = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
            if loader is not None:
                p.weight_loader = loader
            return p

        self.router_weight = param(e, hidden)
        self.router_bias = param(e)
        self.w13 = param(e, 2 * i, hidden, loader=self._gate_up_loader)
        self.b13 = param(e, 2 * i, loader=self._gate_up_loader)
        self.w2 = param(e, hidden, i, loader=self._down_loader)
        self.b2 = param(e, hidden)

    def _gate_up_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        """``loaded``: every expert's fused gate/up, ``[E, 2I, hidden]`` (out, in) or its bias ``[E, 2I]``,
        gate and up interleaved along 2I."""
        full = as_tensor(loaded)
        s, n = self.pstate.tp_rank * self.inter, self.inter
        gate, up = full[:, 0::2][:, s : s + n], full[:, 1::2][:, s : s + n]
        copy_into(param.data, torch.cat([gate, up], dim=1), "the experts' gate/up projection")

    def _down_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        """``loaded``: every expert's down projection ``[E, hidden, I]`` (out, in)."""
        s = self.pstate.tp_rank * self.inter
        copy_into(param.data, as_tensor(loaded)[:, :, s : s + self.inter], "the experts' down projection")

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.router_weight, self.router_bias)
        top, experts = torch.topk(logits, self.top_k, dim=-1)
        return F.softmax(top.float(), dim=-1), experts

    def activation(self, h: torch.Tensor) -> torch.Tensor:
        """``[..., 2 I/tp]`` (gate | up) -> ``[..., I/tp]``: the clamped SwiGLU."""
        gate, up = h.split(self.inter, dim=-1)
        gate = gate.clamp(max=self.limit)
        up = up.clamp(-self.limit, self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        if x.is_cuda and (torch.cuda.is_current_stream_capturing() or x.shape[0] <= SYNC_FREE_MAX_TOKENS):
            return self.forward_dense(x, weights, experts)
        out = torch.zeros_like(x)
        flat = experts.view(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token_of, w_of = order // self.top_k, weights.view(-1)[order]
        bias_down = self.pstate.tp_rank == 0
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            idx = token_of[start : start + c]
            h = self.activation(F.linear(x[idx], self.w13[e], self.b13[e]))
            y = F.linear(h, self.w2[e], self.b2[e] if bias_down else None)
            out.index_add_(0, idx, y * w_of[start : start + c].unsqueeze(-1).to(x.dtype))
            start += c
        return out

    def forward_dense(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The same result with no host sync (CUDA graphs, short steps). Fewer (token, expert) pairs than experts
        (decode at small batch): each pair's expert weights gathered, so only the routed experts are read; more:
        every expert on every token, weighted by the routing (0 for experts a token does not use)."""
        t, e, hidden = x.shape[0], self.num_experts, x.shape[1]
        if t * self.top_k < e:
            flat = experts.flatten()
            h = torch.bmm(self.w13[flat], x.repeat_interleave(self.top_k, 0).unsqueeze(-1)).squeeze(-1)
            h = self.activation(h + self.b13[flat])
            y = torch.bmm(self.w2[flat], h.unsqueeze(-1)).squeeze(-1)
            if self.pstate.tp_rank == 0:
                y = y + self.b2[flat]
            return (y.view(t, self.top_k, -1) * weights.unsqueeze(-1).to(x.dtype)).sum(1)
        gate = torch.zeros(t, e, dtype=x.dtype, device=x.device)
        gate.scatter_(1, experts, weights.to(x.dtype))
        h = self.activation(F.linear(x, self.w13.view(-1, hidden)).view(t, e, -1) + self.b13)  # [T, E, I]
        y = torch.bmm((h * gate.unsqueeze(-1)).transpose(0, 1), self.w2.transpose(1, 2)).sum(0)
        return y + gate @ self.b2 if self.pstate.tp_rank == 0 else y
