"""Token sampling on the device: greedy, temperature, top-k, top-p, per-request seeds, min_tokens, logprobs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.io_struct import TokenLogprob
from server.sampling_params import SamplingParams


@dataclass
class SampleRequest:
    params: SamplingParams
    generator: torch.Generator | None  # per-request RNG: a seeded request samples the same whatever its batch
    banned: list[int]  # token ids masked out (EOS/stop ids while below min_tokens)


def sample(logits: torch.Tensor, reqs: list[SampleRequest]) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits ``[B, V]`` (one row per request) -> chosen token ids and, where asked, their logprobs
    (of the model's distribution, before temperature and filters)."""
    logits = logits.to(torch.float32, copy=True)  # masked in place below; the caller's tensor stays intact
    for i, r in enumerate(reqs):
        if r.banned:
            logits[i, r.banned] = float("-inf")
    tokens = torch.argmax(logits, dim=-1)
    for i, r in enumerate(reqs):
        p = r.params
        if p.greedy:
            continue
        row = logits[i] / p.temperature
        if p.top_k > 0 and p.top_k < row.numel():
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_vals, sorted_idx = torch.sort(row, descending=True)
            probs = torch.softmax(sorted_vals, dim=-1)
            # keep the smallest prefix whose mass reaches top_p (always at least the best token)
            drop = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
            row = row.scatter(0, sorted_idx[drop], float("-inf"))
        probs = torch.softmax(row, dim=-1)
        tokens[i] = torch.multinomial(probs, 1, generator=r.generator)[0]
    token_list = tokens.tolist()
    logprobs: list[TokenLogprob | None] = [None] * len(reqs)
    want = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
    if want:
        lp = torch.log_softmax(logits[want], dim=-1)
        for j, i in enumerate(want):
            k = reqs[i].params.logprobs
            top = []
            if k:
                vals, idx = torch.topk(lp[j], k)
                top = list(zip(idx.tolist(), vals.tolist()))
            logprobs[i] = TokenLogprob(token_list[i], lp[j, token_list[i]].item(), top)
    return token_list, logprobs
