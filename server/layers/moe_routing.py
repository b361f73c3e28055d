"""MoE routers: router logits ``[T, E]`` (fp32) -> routing weights ``[T, k]`` (fp32) and expert ids ``[T, k]``.

One plain function per router kind, as the published checkpoints define them:
- :func:`softmax_topk` (Mixtral, MiniMax-Text-01, Qwen3-MoE / Qwen3-Coder, Qwen3-Next): softmax over all experts,
  the k largest, renormalised to sum 1 when ``renormalize`` (Qwen's ``norm_topk_prob``).
- :func:`sigmoid_topk` (MiniMax-M2): independent sigmoid scores; the experts are *chosen* by score plus the
  checkpoint's ``e_score_correction_bias`` (a load-balancing term learnt without gradients), but *weighted* by the
  plain scores, renormalised, then times ``routed_scaling_factor``.
- :func:`grouped_sigmoid_topk` (GLM-4.5 / 4.6 / 4.7, DeepSeek-V3): the same, choosing only among the experts of the
  ``topk_group`` best of ``n_group`` equal groups, a group scored by the sum of its two best biased scores.

:func:`make_router` binds a family's settings (from :class:`server.models.config.MoEConfig`) into a
``Router``: ``router(logits, correction_bias) -> (weights, experts)``, the form :class:`server.layers.moe.FusedMoE`
takes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

Router = Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]


def softmax_topk(logits: torch.Tensor, bias: torch.Tensor | None, *, top_k: int,
                 renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts, the ``top_k`` best, optionally renormalised (``bias`` must be None)."""
    if bias is not None:
        raise ValueError("softmax routing takes no correction bias")
    weights, experts = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1)
    return (weights / weights.sum(-1, keepdim=True) if renormalize else weights), experts


def sigmoid_topk(logits: torch.Tensor, bias: torch.Tensor | None, *, top_k: int, renormalize: bool = True,
                 scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid scores; experts chosen by ``score + bias``, weighted by ``score`` (renormalised) x ``scaling``."""
    return grouped_sigmoid_topk(logits, bias, top_k=top_k, renormalize=renormalize, scaling=scaling)


def grouped_sigmoid_topk(logits: torch.Tensor, bias: torch.Tensor | None, *, top_k: int, n_group: int = 1,
                         topk_group: int = 1, renormalize: bool = True,
                         scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid scores; the experts of the ``topk_group`` best of ``n_group`` groups compete (a group scores the sum
    of its two best biased scores); chosen by ``score + bias``, weighted by ``score`` (renormalised) x ``scaling``."""
    scores = torch.sigmoid(logits.float())
    choice = scores if bias is None else scores + bias.float()
    if n_group > 1:
        t, e = choice.shape
        grouped = choice.view(t, n_group, e // n_group)
        group_scores = grouped.topk(min(2, e // n_group), dim=-1).values.sum(-1)  # [T, n_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
        choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(t, e)
    experts = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, experts)
    if renormalize:
        # the reference adds 1e-20 to the denominator: a sum of sigmoids, it is never near 0
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * scaling, experts


def make_router(scoring: str, top_k: int, *, renormalize: bool = True, scaling: float = 1.0, n_group: int = 1,
                topk_group: int = 1) -> Router:
    """The router for a config's settings: ``scoring`` is ``softmax`` or ``sigmoid`` (grouped when ``n_group`` > 1)."""
    if scoring == "softmax":
        if scaling != 1.0 or n_group > 1:
            raise ValueError("softmax routing has no routed_scaling_factor or expert groups; use scoring 'sigmoid'")
        return functools.partial(softmax_topk, top_k=top_k, renormalize=renormalize)
    if scoring != "sigmoid":
        raise ValueError(f"MoE scoring function {scoring!r} is not supported (supported: softmax, sigmoid)")
    if n_group > 1:
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group {topk_group} must be between 1 and n_group {n_group}")
        return functools.partial(grouped_sigmoid_topk, top_k=top_k, n_group=n_group, topk_group=topk_group,
                                 renormalize=renormalize, scaling=scaling)
    return functools.partial(sigmoid_topk, top_k=top_k, renormalize=renormalize, scaling=scaling)
