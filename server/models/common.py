"""Pieces shared by the model files: the dense and sparse MLP blocks, the pre-norm decoder layer, and the
checkpoint-name dispatchers (fused q/k/v, stacked experts)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from server.forward.context import ForwardContext
from server.kernels import ops
from server.layers.cache_spec import CacheLayer
from server.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from server.layers.fp8 import Fp8Weight
from server.layers.linear import (
    MergedColumnSeqParallelLinear,
    RowSeqParallelLinear,
    as_tensor,
    default_weight_loader,
)
from server.layers.moe import FusedMoE, moe_block_forward
from server.layers.norm import RMSNorm
from server.layers.row_shard import runs_on_slice
from server.models.config import ModelConfig
from server.sp.groups import ParallelState

# q/k/v checkpoint tensors load into one fused QKV parameter
QKV_RULES = [
    (".self_attn.q_proj.", ".self_attn.qkv_proj.", "q"),
    (".self_attn.k_proj.", ".self_attn.qkv_proj.", "k"),
    (".self_attn.v_proj.", ".self_attn.qkv_proj.", "v"),
]
# a dense SwiGLU MLP's gate/up tensors load into the merged gate_up parameter of GatedMLP
GATED_MLP_RULES = [(".mlp.gate_proj.", ".mlp.gate_up_proj.", 0), (".mlp.up_proj.", ".mlp.gate_up_proj.", 1)]


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
        # weights sharded over SP and not gathered: the linears run on their stored rows (already 1/P of the reads)
        if sp_split and not runs_on_slice(self.gate_up_proj.weight):
            return self.forward_sp_split(x)
        h = self.gate_up_proj(x, seq_sharded)  # [T, 2I]: groups of [gate_g | up_g]
        t = h.shape[0]
        h = ops.silu_and_mul(h.view(t * self.groups, 2 * self.intermediate // self.groups)).view(t, self.intermediate)
        return self.down_proj(h, seq_sharded)

    def sp_splittable(self) -> bool:
        quantized = self.gate_up_proj.quantized or self.down_proj.quantized  # the split reads the weights directly
        return self.pstate.sp_size > 1 and self.groups == self.pstate.sp_size and not quantized

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


class MoEMLP(nn.Module):
    """A decoder layer's sparse MLP: ``moe`` (:class:`server.layers.moe.FusedMoE` or
    :class:`server.layers.moe.SharedExpertMoE`) TP-sliced returns each TP rank's partial sum, which one TP reduction
    completes (a reduce-scatter over tokens when the residual stream is sequence-sharded, after gathering them);
    expert parallel, its rows are exchanged with the experts' owners (:func:`server.layers.moe.moe_block_forward`)."""

    def __init__(self, moe: nn.Module, pstate: ParallelState):
        super().__init__()
        self.moe = moe
        self.pstate = pstate

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if ctx.split_mlp:  # CausalLM.sp_split_mlp_ok is False for models with MoE layers
            raise ValueError("the SP-split MLP is for dense MLPs")
        return moe_block_forward(self.moe, x, ctx)


def mlp_forward(mlp: nn.Module, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
    """A decoder layer's MLP on ``x``: a sparse one reads the step's rows (expert parallelism dispatches each row
    once), a dense one only how the rows are sharded and whether it splits over SP."""
    if isinstance(mlp, MoEMLP):
        return mlp(x, ctx)
    return mlp(x, ctx.seq_sharded, ctx.split_mlp)


class PreNormDecoderLayer(nn.Module):
    """``x + attn(norm(x))``, then ``x + mlp(norm(x))``: the decoder layer of the Llama-shaped families (the MoE
    ones pass a :class:`MoEMLP` on their sparse layers). ``mlp_name`` is the checkpoint's name for the MLP."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, cfg: ModelConfig, dtype: torch.dtype,
                 mlp_name: str = "mlp"):
        super().__init__()
        self.self_attn = self_attn
        self.mlp_name = mlp_name
        setattr(self, mlp_name, mlp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + mlp_forward(getattr(self, self.mlp_name), self.post_attention_layernorm(x), ctx)


def stacked_expert_weights(weights: Iterable[tuple[str, object]], params: dict[str, nn.Parameter], ck_experts: str,
                           param_moe: str, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
                           num_layers: int | None = None) -> Iterator[tuple[str, object]]:
    """Expert tensors to the stacked parameters of a :class:`server.layers.moe.FusedMoE`; others pass through.

    Per expert, ``{layer}{ck_experts}{e}.{gate|up|down}.weight`` (``names`` as the checkpoint spells them, e.g.
    ``w1, w3, w2``), or fused, ``{layer}{ck_experts}gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``, load into
    ``{layer}{param_moe}w13`` / ``w2``. With ``num_layers``, tensors of layers beyond it (multi-token-prediction
    layers that some checkpoints append, e.g. GLM-4.5's) are skipped: they are not served."""
    gate, up, down = names
    for name, t in weights:
        base = name.removeprefix("model.")
        if num_layers is not None and base.startswith("layers.") and int(base.split(".")[1]) >= num_layers:
            continue
        if ck_experts not in base:
            yield name, t
            continue
        prefix, rest = base.split(ck_experts)
        w13, w2 = params[prefix + param_moe + "w13"], params[prefix + param_moe + "w2"]
        if rest in ("gate_up_proj", "down_proj"):
            # FP8: each expert's rows stay FP8 with their scales (Fp8Weight.rows); otherwise one read of the tensor
            full = t if isinstance(t, Fp8Weight) else as_tensor(t)
            rows = full.rows if isinstance(full, Fp8Weight) else full.__getitem__
            inter = full.shape[-1] if rest == "down_proj" else full.shape[1] // 2
            for e in range(full.shape[0]):
                if rest == "down_proj":
                    w2.weight_loader(w2, rows(e), e)
                else:
                    w13.weight_loader(w13, rows((e, slice(None, inter))), (e, 0))
                    w13.weight_loader(w13, rows((e, slice(inter, None))), (e, 1))
            continue
        expert, which, _ = rest.split(".")
        if which == down:
            w2.weight_loader(w2, t, int(expert))
        elif which in (gate, up):
            w13.weight_loader(w13, t, (int(expert), 0 if which == gate else 1))
        else:
            raise ValueError(f"checkpoint tensor {name!r}: expected expert weights named {names}")


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

    def moe_layers(self) -> list[FusedMoE]:
        """Every routed-expert layer, in model order (expert-parallel exchange counts, the rank's expert range)."""
        return [m for m in self.modules() if isinstance(m, FusedMoE)]

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
