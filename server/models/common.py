"""Pieces shared by the model files: config access, the MLP block, and the checkpoint-name dispatcher."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from server.layers.linear import MergedColumnSeqParallelLinear, RowSeqParallelLinear, default_weight_loader
from server.sp.groups import ParallelState


def head_dim_of(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


class GatedMLP(nn.Module):
    """SwiGLU MLP: ``down(silu(gate(x)) * up(x))`` with gate/up merged and column-split, down row-split."""

    def __init__(self, hidden: int, intermediate: int, pstate: ParallelState, dtype: torch.dtype,
                 bias: bool = False):
        super().__init__()
        self.gate_up_proj = MergedColumnSeqParallelLinear(hidden, [intermediate, intermediate], pstate, bias, dtype)
        self.down_proj = RowSeqParallelLinear(intermediate, hidden, pstate, bias, dtype)

    def forward(self, x: torch.Tensor, seq_sharded: bool) -> torch.Tensor:
        h = self.gate_up_proj(x, seq_sharded)
        g, u = h.chunk(2, dim=-1)
        return self.down_proj(F.silu(g) * u, seq_sharded)


def load_named_weights(model: nn.Module, weights: Iterable[tuple[str, object]], rules: list[tuple[str, str, object]],
                       ignore: tuple[str, ...] = ()) -> set[str]:
    """Dispatch checkpoint tensors to parameters.

    ``rules`` are ``(checkpoint_fragment, param_fragment, shard_id)``: a checkpoint name (without its ``model.``
    prefix) containing the fragment loads into the parameter named by replacing it, through that parameter's
    ``weight_loader`` with ``shard_id``; other names load into the parameter of the same name. Names
    containing any of ``ignore`` are skipped. Returns the parameter names that were loaded; raises on names
    that match no parameter.
    """
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
        name = name.removeprefix("model.")
        if any(frag in name for frag in ignore):
            continue
        target, shard = name, None
        for ck, pm, sid in rules:
            if ck in name:
                target, shard = name.replace(ck, pm), sid
                break
        if target not in params:
            raise ValueError(f"checkpoint tensor {name!r} matches no model parameter (looked for {target!r})")
        param = params[target]
        loader = getattr(param, "weight_loader", default_weight_loader)
        loader(param, tensor, shard) if shard is not None else loader(param, tensor)
        loaded.add(target)
    return loaded
