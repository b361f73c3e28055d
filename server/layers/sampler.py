"""Token sampling on the device, batched: logit bias, min_tokens masks, repetition / frequency / presence
penalties, structured-output grammar masks, greedy, temperature, top-k, top-p, min-p, per-request seeds and
logprobs.

Each control costs only when a request of the batch uses it: the batch is split once into the rows that use
it, and a step whose requests use none runs the same few kernels as plain greedy / temperature sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain

import torch

from server.sampling_params import SamplingParams


@dataclass
class TokenLogprob:
    """A sampled token's logprob and the top alternatives ``(token_id, logprob)``, best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SampleRequest:
    """One row's sampling settings and history for a step's sampler call."""

    params: SamplingParams
    generator: torch.Generator | None  # per-request RNG: a seeded request samples the same whatever its batch
    banned: list[int]  # token ids masked out (EOS/stop ids while below min_tokens)
    prompt_ids: Sequence[int] = field(default_factory=list)  # read only when repetition_penalty != 1
    output_ids: Sequence[int] = field(default_factory=list)  # read only when a penalty is set


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """In place on ``logits [B, V]`` (fp32): in row ``rows[j]`` set -inf every token whose bit is 0 in
    ``bitmask[j]`` (int32 ``[len(rows), ceil(V / 32)]``, xgrammar's layout: token t is bit t % 32 of word t // 32);
    the other rows are untouched. Plain torch: a few elementwise kernels on the device."""
    n, vocab = len(rows), logits.shape[-1]
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).bool().view(n, -1)[:, :vocab]
    if n == logits.shape[0] and rows == list(range(n)):
        logits.masked_fill_(~allowed, float("-inf"))
    else:
        index = torch.tensor(rows).to(logits.device, non_blocking=True)
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


@dataclass
class TokenMask:
    """The grammar bitmask of a step's constrained rows: ``bitmask[j]`` (on the device) is row ``rows[j]``'s."""

    rows: list[int]
    bitmask: torch.Tensor


def _rows(reqs: list[SampleRequest], used) -> list[int]:
    return [i for i, r in enumerate(reqs) if used(r)]


def _flat_index(rows: list[int], ids: list[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """(row, token id) index tensors of every id of ``ids[j]`` in row ``rows[j]``: one host-to-device copy each."""
    row = torch.tensor(list(chain.from_iterable([r] * len(x) for r, x in zip(rows, ids))), dtype=torch.long)
    tok = torch.tensor(list(chain.from_iterable(ids)), dtype=torch.long)
    return row.to(device, non_blocking=True), tok.to(device, non_blocking=True)


def _take(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Rows ``rows`` of ``x``; ``x`` itself (no copy) when they are all of them."""
    return x if len(rows) == x.shape[0] else x[rows]


def _column(reqs: list[SampleRequest], name: str, device: torch.device) -> torch.Tensor:
    """Sampling parameter ``name`` of each request, as a ``[len(reqs), 1]`` fp32 column."""
    return torch.tensor([getattr(r.params, name) for r in reqs], dtype=torch.float32).to(device)[:, None]


def apply_logit_controls(logits: torch.Tensor, reqs: list[SampleRequest]) -> None:
    """In place on fp32 ``logits [B, V]``: logit bias, bans, then the penalties (see SamplingParams)."""
    dev = logits.device
    rows = _rows(reqs, lambda r: r.params.logit_bias)
    if rows:
        biases = [reqs[i].params.logit_bias for i in rows]
        row, tok = _flat_index(rows, [list(b) for b in biases], dev)
        values = torch.tensor(list(chain.from_iterable(b.values() for b in biases)), dtype=torch.float32)
        logits.index_put_((row, tok), values.to(dev), accumulate=True)
    rows = _rows(reqs, lambda r: r.banned)
    if rows:
        index = _flat_index(rows, [reqs[i].banned for i in rows], dev)
        logits.index_put_(index, torch.tensor(float("-inf"), device=dev))
    rows = _rows(reqs, lambda r: r.params.uses_penalties)
    if rows:
        _apply_penalties(logits, reqs, rows)


def _apply_penalties(logits: torch.Tensor, reqs: list[SampleRequest], rows: list[int]) -> None:
    dev = logits.device
    penalized = [reqs[i] for i in rows]
    sub = _take(logits, rows)
    counts = torch.zeros_like(sub)
    local = list(range(len(rows)))
    counts.index_put_(_flat_index(local, [reqs[i].output_ids for i in rows], dev), torch.ones((), device=dev),
                      accumulate=True)
    rep_local = [j for j, i in enumerate(rows) if reqs[i].params.repetition_penalty != 1.0]
    if rep_local:
        seen = counts > 0
        seen.index_put_(_flat_index(rep_local, [reqs[rows[j]].prompt_ids for j in rep_local], dev),
                        torch.ones((), dtype=torch.bool, device=dev))
        rep = _column(penalized, "repetition_penalty", dev)
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub -= _column(penalized, "frequency_penalty", dev) * counts
    sub -= _column(penalized, "presence_penalty", dev) * (counts > 0)
    if sub is not logits:  # the penalties were not applied in place
        logits[rows] = sub


def _needs_filter(p: SamplingParams, vocab: int) -> bool:
    return p.min_p > 0 or 0 < p.top_k < vocab or p.top_p < 1.0


def _filter(x: torch.Tensor, reqs: list[SampleRequest]) -> torch.Tensor:
    """Temperature-scaled logits ``x`` (row j is ``reqs[j]``'s) after min-p, then top-k and top-p (-inf =
    dropped), each applied to the rows that use it only; ``x`` itself may be changed."""
    vocab = x.shape[-1]
    for uses, apply in ((lambda p: p.min_p > 0, _min_p),
                        (lambda p: 0 < p.top_k < vocab or p.top_p < 1.0, _top_k_top_p)):
        sub = [j for j, r in enumerate(reqs) if uses(r.params)]
        if len(sub) == len(reqs):
            x = apply(x, reqs)
        elif sub:
            x[sub] = apply(x[sub], [reqs[j] for j in sub])
    return x


def _min_p(x: torch.Tensor, reqs: list[SampleRequest]) -> torch.Tensor:
    probs = torch.softmax(x, dim=-1)
    floor = _column(reqs, "min_p", x.device) * probs.max(dim=-1, keepdim=True).values
    return x.masked_fill(probs < floor, float("-inf"))


def _top_k_top_p(x: torch.Tensor, reqs: list[SampleRequest]) -> torch.Tensor:
    """Drop what is below each row's cut: its k-th largest logit, and the smallest logit of the shortest run of
    best tokens (within the top k) whose probability mass reaches top_p."""
    dev, vocab = x.device, x.shape[-1]
    ks = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in reqs]
    width = max(ks)  # candidates: the top max(k) when every row has a top-k (no full sort), else all
    # ascending order (a descending sort is markedly slower on CPU)
    vals = torch.topk(x, width, dim=-1).values.flip(-1) if width < vocab else torch.sort(x, dim=-1).values
    first = width - torch.tensor(ks, device=dev)[:, None]  # index of each row's k-th largest candidate
    if min(ks) < width:
        vals = vals.masked_fill(torch.arange(width, device=dev)[None, :] < first, float("-inf"))
    cut = vals.gather(1, first)
    if any(r.params.top_p < 1.0 for r in reqs):
        # drop a token when the better ones alone already reach top_p: its cumulative mass from below <= 1 - top_p
        drop = torch.cumsum(torch.softmax(vals, dim=-1), dim=-1) <= 1.0 - _column(reqs, "top_p", dev)
        drop[:, -1] = False  # never the best token
        cut = torch.maximum(cut, vals.masked_fill(drop, float("inf")).min(dim=-1, keepdim=True).values)
    return x.masked_fill(x < cut, float("-inf"))


def _draw(logits: torch.Tensor, reqs: list[SampleRequest], rows: list[int], tokens: torch.Tensor) -> None:
    """Sample ``tokens[i]`` for each row ``i`` in ``rows``: one draw from the request's own generator. Rows
    without filters are scaled and drawn one by one (cache-friendly on CPU); filtered rows are filtered at once."""
    sampled = [reqs[i] for i in rows]
    x = _take(logits, rows)
    need = [j for j, r in enumerate(sampled) if _needs_filter(r.params, x.shape[-1])]
    filtered = {}
    if need:
        picked = [sampled[j] for j in need]
        filtered = dict(zip(need, _filter(_take(x, need) / _column(picked, "temperature", x.device), picked)))
    for j, (i, r) in enumerate(zip(rows, sampled)):
        row = filtered[j] if j in filtered else x[j] / r.params.temperature
        tokens[i] = torch.multinomial(torch.softmax(row, dim=-1), 1, generator=r.generator)[0]


class SampledBatch:
    """A batch sampled on the device whose results reach the host later: the token ids stay on the device
    (``tokens``, where the next step can read them) and are copied to the host without waiting; :meth:`result`
    waits for that copy only."""

    def __init__(self, tokens: torch.Tensor, logprob_rows: list[int], reqs: list[SampleRequest],
                 logprob_parts: tuple[torch.Tensor, ...] = ()):
        self.tokens = tokens
        self.reqs = reqs
        self.logprob_rows = logprob_rows
        dev = tokens.device
        async_copy = dev.type == "cuda"
        self._host = [x.to("cpu", non_blocking=async_copy) for x in (tokens, *logprob_parts)]
        self._ready = None
        if async_copy:
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(dev))

    def result(self) -> tuple[list[int], list[TokenLogprob | None]]:
        """The chosen token ids and, where asked, their logprobs (waits for the device)."""
        if self._ready is not None:
            self._ready.synchronize()
        token_list = self._host[0].tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(self.reqs)
        if self.logprob_rows:
            chosen, top_vals, top_idx = (x.tolist() for x in self._host[1:])
            for j, i in enumerate(self.logprob_rows):
                params = self.reqs[i].params
                n = len(params.logprob_token_ids) if params.logprob_token_ids else params.logprobs
                logprobs[i] = TokenLogprob(token_list[i], chosen[j], list(zip(top_idx[j][:n], top_vals[j][:n])))
        return token_list, logprobs


def sample_async(logits: torch.Tensor, reqs: list[SampleRequest], mask: TokenMask | None = None) -> SampledBatch:
    """:func:`sample` without waiting for the device: the host copies of its results are under way."""
    logits = logits.to(torch.float32, copy=True)  # changed in place below; the caller's tensor stays intact
    apply_logit_controls(logits, reqs)
    if mask is not None:
        apply_token_bitmask(logits, mask.bitmask, mask.rows)
    tokens = torch.argmax(logits, dim=-1)
    rows = _rows(reqs, lambda r: not r.params.greedy)
    if rows:
        _draw(logits, reqs, rows, tokens)
    want = _rows(reqs, lambda r: r.params.logprobs is not None)
    if not want:
        return SampledBatch(tokens, [], reqs)
    lp = torch.log_softmax(_take(logits, want), dim=-1)
    chosen = lp.gather(1, tokens[want][:, None])[:, 0]
    k = max(max(reqs[i].params.logprobs, len(reqs[i].params.logprob_token_ids)) for i in want)
    values, indices = torch.topk(lp, k)
    for j, i in enumerate(want):  # vLLM's logprob_token_ids: these ids' logprobs instead of the top k
        pinned = reqs[i].params.logprob_token_ids
        if pinned:
            ids = torch.tensor(pinned, device=lp.device)
            indices[j, : len(pinned)] = ids
            values[j, : len(pinned)] = lp[j, ids]
    return SampledBatch(tokens, want, reqs, (chosen, values, indices))


def sample(logits: torch.Tensor, reqs: list[SampleRequest], mask: TokenMask | None = None
           ) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits ``[B, V]`` (one row per request) -> chosen token ids and, where asked, their logprobs (of the
    distribution after the logit controls and the grammar ``mask`` of the constrained rows, before temperature
    and the top-k / top-p / min-p filters)."""
    return sample_async(logits, reqs, mask).result()
