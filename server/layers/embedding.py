"""Vocab-parallel embedding and LM head: the vocabulary is split over TP (and each TP slice's rows over SP with
``--shard-dense-weights``, :mod:`server.layers.row_shard`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.layers.linear import as_tensor, copy_into
from server.layers.row_shard import dense_parameter, row_window, runs_on_slice
from server.sp.groups import ParallelState


class VocabParallelEmbedding(nn.Module):
    """Each TP rank holds rows ``[tp_rank * V/tp, (tp_rank+1) * V/tp)`` (vocab padded up to a multiple of tp).
    Tokens outside the rank's range embed to zero; the partial embeddings are summed over TP (all-reduce, or
    reduce-scatter over tokens when the residual stream is sequence-sharded)."""

    def __init__(self, vocab_size: int, hidden: int, pstate: ParallelState, dtype: torch.dtype | None = None):
        super().__init__()
        self.pstate = pstate
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // pstate.tp_size)
        self.start = pstate.tp_rank * self.per_rank
        self.weight = dense_parameter(self.per_rank, hidden, pstate, dtype)
        self.weight.data.zero_()
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        """This TP rank's vocabulary rows (those it stores, when sharded over SP); rows past the vocabulary stay 0."""
        lo, hi = row_window(param)
        n = max(0, min(hi, self.vocab_size - self.start) - lo)
        param.data.zero_()
        copy_into(param.data[:n], as_tensor(loaded[self.start + lo : self.start + lo + n]), "the vocabulary embedding")

    def forward(self, ids: torch.Tensor, seq_sharded: bool = False) -> torch.Tensor:
        sliced = runs_on_slice(self.weight)  # ids the same on every SP rank: each embeds its stored rows, summed
        if self.pstate.tp_size == 1 and not sliced:
            return F.embedding(ids, self.weight)
        lo, hi = row_window(self.weight) if sliced else (0, self.per_rank)
        local = ids - self.start - lo
        valid = (local >= 0) & (local < hi - lo)
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        x = x * valid.unsqueeze(-1).to(self.weight.dtype)
        if sliced:
            x = self.pstate.sp_all_reduce(x)
        return self.pstate.tp_reduce_scatter(x) if seq_sharded else self.pstate.tp_all_reduce(x)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over the vocabulary: each TP rank computes its slice, gathered into full rows over TP."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        part = F.linear(hidden, self.weight)
        full = self.pstate.tp_all_gather(part, dim=-1)
        return full[..., : self.vocab_size]
