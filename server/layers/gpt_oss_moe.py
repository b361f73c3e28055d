"""gpt-oss's sparse MLP: a router with bias, softmax over the top-k logits, and experts with biases and a clamped
SwiGLU, in either layout of :class:`server.layers.moe.FusedMoE` (TP-sliced, or expert parallel over every rank).

Per expert (as transformers' reference computes it): ``h = W13 x + b13``; gate and up are the even and odd columns
of the checkpoint's fused ``gate_up_proj`` (interleaved); ``gate = min(gate, limit)``, ``up = clamp(up, -limit,
limit)``, ``a = (up + 1) * gate * sigmoid(alpha * gate)``; ``y = W2 a + b2``. The gate/up rows are de-interleaved
at load into ``[gate; up]``, so the base class's matmuls and dispatch apply unchanged; only the activation (with
the gate/up bias) and the down bias differ. TP-sliced, every TP rank holds each expert's slice of the intermediate
and the down bias is added by TP rank 0 only (the partial sums are reduced over TP); expert parallel, a rank holds
its experts whole and adds their down bias to every pair it computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.layers.linear import as_tensor, copy_into
from server.layers.moe import FusedMoE
from server.sp.groups import ParallelState


class GptOssMoE(FusedMoE):
    """x ``[T, hidden]`` -> as :class:`FusedMoE`. Beside its weights: ``b13 [E_local, 2 I_local]`` (gate, then
    up), ``b2 [E_local, hidden]``, and the router's bias ``[E]`` (replicated, like the router)."""

    def __init__(self, num_experts: int, top_k: int, hidden: int, intermediate: int, pstate: ParallelState,
                 dtype: torch.dtype | None, alpha: float, limit: float):
        super().__init__(num_experts, top_k, hidden, intermediate, pstate, dtype)
        self.alpha, self.limit = alpha, limit
        local = self.num_local_experts

        def param(*shape: int, loader=None) -> nn.Parameter:
            p = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
            if loader is not None:
                p.weight_loader = loader
            return p

        self.router_bias = param(num_experts)
        self.b13 = param(local, 2 * self.inter, loader=self._gate_up_loader)
        self.b2 = param(local, hidden, loader=self._down_bias_loader)
        self.w13.weight_loader = self._gate_up_loader
        self.w2.weight_loader = self._down_loader

    def _gate_up_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        """``loaded``: every expert's fused gate/up, ``[E, 2I, hidden]`` (out, in) or its bias ``[E, 2I]``,
        gate and up interleaved along 2I; this rank keeps its experts' rows of its slice."""
        full = as_tensor(loaded)[self.first : self.end]
        s, n = self._slice_start(), self.inter
        gate, up = full[:, 0::2][:, s : s + n], full[:, 1::2][:, s : s + n]
        copy_into(param.data, torch.cat([gate, up], dim=1), "the experts' gate/up projection")

    def _down_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        """``loaded``: every expert's down projection ``[E, hidden, I]`` (out, in)."""
        s = self._slice_start()
        copy_into(param.data, as_tensor(loaded)[self.first : self.end, :, s : s + self.inter],
                  "the experts' down projection")

    def _down_bias_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        copy_into(param.data, as_tensor(loaded)[self.first : self.end], "the experts' down bias")

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax over the top-k biased logits (in fp32)."""
        top, experts = torch.topk(F.linear(x, self.gate, self.router_bias), self.top_k, dim=-1)
        return F.softmax(top.float(), dim=-1), experts

    def activate(self, h: torch.Tensor, experts: torch.Tensor | int | None) -> torch.Tensor:
        """The clamped SwiGLU of ``h + b13``."""
        gate, up = (h + (self.b13 if experts is None else self.b13[experts])).split(self.inter, dim=-1)
        gate = gate.clamp(max=self.limit)
        up = up.clamp(-self.limit, self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def down_bias(self) -> torch.Tensor | None:
        return self.b2 if self.expert_parallel or self.pstate.tp_rank == 0 else None
