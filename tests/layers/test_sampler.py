"""The batched sampler against a row-by-row plain-torch reference of every logit control and filter."""

from __future__ import annotations

import pytest
import torch

from server.layers.sampler import SampleRequest, sample
from server.sampling_params import SamplingParams

V = 64


def reference_logits(logits: torch.Tensor, r: SampleRequest) -> torch.Tensor:
    """One row, the formulas as documented in SamplingParams, token by token."""
    x = logits.clone().double()
    p = r.params
    for t, b in p.logit_bias.items():
        x[t] += b
    x[r.banned] = float("-inf")
    for t in range(V):
        if p.repetition_penalty != 1.0 and (t in r.prompt_ids or t in r.output_ids):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        n = list(r.output_ids).count(t)
        x[t] -= p.frequency_penalty * n + p.presence_penalty * (n > 0)
    return x


def allowed(x: torch.Tensor, p: SamplingParams) -> set[int]:
    """Tokens that survive temperature, top-k, top-p and min-p in the reference order."""
    probs = torch.softmax(x / p.temperature, dim=-1)
    order = torch.argsort(probs, descending=True).tolist()
    keep = order[: p.top_k] if p.top_k > 0 else order
    kept = probs[keep] / probs[keep].sum()
    mass, out = 0.0, []
    for t, q in zip(keep, kept.tolist()):
        if mass >= p.top_p:
            break
        out.append(t)
        mass += q
    return {t for t in out if probs[t] >= p.min_p * probs.max()}


REQUESTS = [
    SamplingParams(temperature=0, logit_bias={3: 100.0, 5: -100.0}),
    SamplingParams(temperature=0, repetition_penalty=1.7),
    SamplingParams(temperature=0, frequency_penalty=1.5, presence_penalty=-0.5, logprobs=3),
    SamplingParams(temperature=0, min_tokens=4, logprobs=0, logit_bias={"7": 2.5}, repetition_penalty=0.6),
    SamplingParams(temperature=0),
    SamplingParams(temperature=0.8, top_k=5, top_p=0.7, min_p=0.2, seed=3, presence_penalty=2.0),
    SamplingParams(temperature=1.3, min_p=0.3, seed=4, logprobs=2, frequency_penalty=0.7),
]


def make_requests(gen: torch.Generator) -> list[SampleRequest]:
    out = []
    for i, p in enumerate(REQUESTS):
        prompt = torch.randint(0, V, (9,), generator=gen).tolist()
        output = torch.randint(0, V, (i * 3,), generator=gen).tolist()
        banned = [1, 2] if len(output) < p.min_tokens else []
        rng = None if p.greedy else torch.Generator().manual_seed(p.seed)
        out.append(SampleRequest(p, rng, banned, prompt, output))
    return out


def test_batched_controls_match_the_reference():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(len(REQUESTS), V, generator=gen) * 3
    reqs = make_requests(gen)
    tokens, logprobs = sample(logits, reqs)
    for i, r in enumerate(reqs):
        x = reference_logits(logits[i], r)
        lp = torch.log_softmax(x, dim=-1)
        if r.params.greedy:
            assert tokens[i] == int(torch.argmax(x)), i
        else:
            assert tokens[i] in allowed(x.float(), r.params), i
        if r.params.logprobs is not None:
            assert logprobs[i].token_id == tokens[i]
            assert logprobs[i].logprob == pytest.approx(lp[tokens[i]].item(), abs=1e-4)
            assert [t for t, _ in logprobs[i].top] == torch.topk(lp, r.params.logprobs).indices.tolist()
        else:
            assert logprobs[i] is None
    assert tokens[0] == 3 and tokens[3] not in (1, 2)


@pytest.mark.parametrize("i", range(len(REQUESTS)))
def test_each_request_alone_matches_its_row_in_the_batch(i):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(len(REQUESTS), V, generator=gen) * 3
    batch, batch_lp = sample(logits, make_requests(torch.Generator().manual_seed(5)))
    [alone], [alone_lp] = sample(logits[i : i + 1], make_requests(torch.Generator().manual_seed(5))[i : i + 1])
    assert alone == batch[i]
    assert (alone_lp is None) == (batch_lp[i] is None)
    if alone_lp is not None:
        assert alone_lp.logprob == pytest.approx(batch_lp[i].logprob, abs=1e-5)


def test_sampled_tokens_stay_inside_the_filters_and_seeds_repeat():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(len(REQUESTS), V, generator=gen) * 3
    reqs = make_requests(gen)
    seen: dict[int, set[int]] = {5: set(), 6: set()}
    for _ in range(200):
        tokens, _ = sample(logits, reqs)
        for i in seen:
            seen[i].add(tokens[i])
    for i in seen:
        ok = allowed(reference_logits(logits[i], reqs[i]).float(), reqs[i].params)
        assert seen[i] <= ok and len(seen[i]) > 1, (i, seen[i], ok)
    a, _ = sample(logits, make_requests(torch.Generator().manual_seed(1)))
    b, _ = sample(logits, make_requests(torch.Generator().manual_seed(1)))
    assert a == b


@pytest.mark.parametrize("bad", [{"logit_bias": {"x": 1.0}}, {"logit_bias": {5: 101.0}}, {"min_p": 1.5},
                                 {"presence_penalty": 2.5}, {"repetition_penalty": 0.0}, {"repetition_penalty": 1e-300},
                                 {"frequency_penalty": -3}])
def test_out_of_range_controls_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_logprob_token_ids_give_those_tokens_logprobs():
    """vLLM's logprob_token_ids: a row's alternatives are the given ids, in order, with their log-softmax values (fp64
    reference); other rows in the batch keep their top-k alternatives."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, V, generator=gen)
    pinned = SamplingParams(temperature=0, logprobs=1, logprob_token_ids=[7, 0, V - 1])
    plain = SamplingParams(temperature=0, logprobs=2)
    tokens, lps = sample(logits.clone(), [SampleRequest(pinned, None, [], [], []), SampleRequest(plain, None, [], [],
                                                                                                  [])])
    ref = torch.log_softmax(logits.double(), dim=-1)
    assert [t for t, _ in lps[0].top] == [7, 0, V - 1]
    assert [v for _, v in lps[0].top] == pytest.approx([ref[0, t].item() for t in (7, 0, V - 1)], abs=1e-5)
    assert lps[0].logprob == pytest.approx(ref[0, tokens[0]].item(), abs=1e-5)
    assert [t for t, _ in lps[1].top] == ref[1].topk(2).indices.tolist()
