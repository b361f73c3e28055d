"""Pieces shared by the model files: config access, the MLP block, and the checkpoint-name dispatcher."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from server.kernels import ops
from server.layers.cache_spec import CacheLayer
from server.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from server.layers.linear import MergedColumnSeqParallelLinear, RowSeqParallelLinear, default_weight_loader
from server.layers.norm import RMSNorm
from server.models.config import ModelConfig
from server.sp.groups import ParallelState

# q/k/v checkpoint tensors load into one fused QKV parameter
QKV_RULES = [
    (".self_attn.q_proj.", ".self_attn.qkv_proj.", "q"),
    (".self_attn.k_proj.", ".self_attn.qkv_proj.", "k"),
    (".self_attn.v_proj.", ".self_attn.qkv_proj.", "v"),
]




class GatedMLP(nn.Module):
    """SwiGLU MLP: ``down(silu(gate(x)) * up(x))`` with gate/up merged and column-split, down row-split.

    With sp > 1 the merged gate/up rows are stored in sp groups (``[gate_0, up_0, gate_1, up_1]`` at sp = 2, see
    :class:`server.layers.linear.MergedColumnParallelLinear`): the intermediate's order is unchanged (group after
    group), and SP rank r's share of the intermediate is one contiguous block of rows."""

    def __init__(self, hidden: int, intermediate: int, pstate: ParallelState, dtype: torch.dtype,
                 bias: bool = False):
        super().__init__()
        self.pstate = pstate
        self.intermediate = intermediate // pstate.tp_size  # this TP rank's share
        self.groups = pstate.sp_size if self.intermediate % pstate.sp_size == 0 else 1
        self.gate_up_proj = MergedColumnSeqParallelLinear(hidden, [intermediate, intermediate], pstate, bias, dtype,
                                                          groups=self.groups)
        self.down_proj = RowSeqParallelLinear(intermediate, hidden, pstate, bias, dtype)

    def forward(self, x: torch.Tensor, seq_sharded: bool, sp_split: bool = False) -> torch.Tensor:
        if sp_split:
            return self.forward_sp_split(x)
        h = self.gate_up_proj(x, seq_sharded)  # [T, 2I]: groups of [gate_g | up_g]
        t = h.shape[0]
        h = ops.silu_and_mul(h.view(t * self.groups, 2 * self.intermediate // self.groups)).view(t, self.intermediate)
        return self.down_proj(h, seq_sharded)

    def sp_splittable(self) -> bool:
        return self.pstate.sp_size > 1 and self.groups == self.pstate.sp_size

    def forward_sp_split(self, x: torch.Tensor) -> torch.Tensor:
        """The same result when ``x`` is identical on every SP rank: SP rank r computes its group of the
        intermediate (rows ``[2 r I/P, 2 (r+1) I/P)`` of gate/up, columns ``[r I/P, (r+1) I/P)`` of down: views of
        the weights it holds, 1/P of the bytes), and the partial down projections are summed over TP, then over SP.
        Decode of long replicated requests reads the weights on every SP rank; this cuts that read to 1/P for one
        all-reduce of the rows per layer (docs/sp.md, "Decode: dense MLPs split over the SP ranks")."""
        r, part = self.pstate.sp_rank, self.intermediate // self.pstate.sp_size
        rows = slice(2 * r * part, 2 * (r + 1) * part)
        bias = self.gate_up_proj.bias
        h = torch.nn.functional.linear(x, self.gate_up_proj.weight[rows], None if bias is None else bias[rows])
        h = torch.nn.functional.linear(ops.silu_and_mul(h), self.down_proj.weight[:, r * part : (r + 1) * part])
        h = self.pstate.sp_all_reduce(self.pstate.tp_all_reduce(h))
        return h if self.down_proj.bias is None else h + self.down_proj.bias


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


class CausalLM(nn.Module):
    """Embedding -> decoder layers -> final norm -> LM head, shared by the model files; subclasses build
    ``self.layers`` (each ``layer(x, ctx) -> x``)."""

    config_class: type[ModelConfig] = ModelConfig

    def __init__(self, cfg: ModelConfig, pstate: ParallelState, dtype: torch.dtype):
        super().__init__()
        self.pstate = pstate
        self.cfg = cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, pstate, dtype)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.tie = cfg.tie_word_embeddings
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, pstate, dtype)

    def forward(self, ctx) -> torch.Tensor:
        """Final hidden states of this rank's local rows ``[T, hidden]`` (all rows, also when seq-sharded)."""
        ctx.shared.clear()  # derived per forward: a context reused (CUDA-graph warm-up, then capture) derives anew
        x = self.embed_tokens(ctx.input_ids, ctx.seq_sharded)
        for layer in self.layers:
            x = layer(x, ctx)
        x = self.norm(x)
        return self.pstate.tp_all_gather(x, dim=0) if ctx.seq_sharded else x

    def cache_layers(self) -> list[CacheLayer]:
        """Every layer that keeps per-request state, in model order (the engine allocates their caches)."""
        return [m for m in self.modules() if isinstance(m, CacheLayer)]

    def sp_split_mlp_ok(self) -> bool:
        """Every layer's MLP is dense and splits evenly over the SP ranks (:meth:`GatedMLP.forward_sp_split`)."""
        mlps = [getattr(layer, "mlp", None) for layer in self.layers]
        return self.pstate.sp_size > 1 and all(isinstance(m, GatedMLP) and m.sp_splittable() for m in mlps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.logits(hidden)

    def load_checkpoint(self, weights: Iterable[tuple[str, object]], rules, ignore: tuple[str, ...] = ()) -> None:
        """:func:`load_named_weights`, then the LM head from the embedding when the two are tied."""
        weights = list(weights) if self.tie else weights
        loaded = load_named_weights(self, weights, rules, ignore)
        if self.tie and "lm_head.weight" not in loaded:
            emb = next(t for n, t in weights if n.endswith("embed_tokens.weight"))
            self.lm_head.weight_loader(self.lm_head.weight, emb)
