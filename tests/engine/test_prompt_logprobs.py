"""Prompt logprobs through the normal serving path against transformers' log_softmax (CPU, fp32; tolerance as in
test_parity): a long prompt chunked and, at sp=2, split over SP and finished by a replicated tail chunk, a short one
homed on one SP rank, batched with a request that asks for none; at sp=1, sp=2 and sp=2 x tp=2."""

from __future__ import annotations

import pytest
import torch

from server import LLM, SamplingParams
from server.messages import GenerateRequest, PromptTokenLogprob, RequestOutput
from tests.helpers import hf_model, prompt, save_tiny_model

LONG = prompt(70)  # sp=2: split chunks of 32 and 32, then a replicated tail of 6 (< sp_min_tokens)
SHORT = prompt(6, seed=5)  # below sp_min_tokens: homed on one SP rank
OTHER = prompt(30, seed=7)  # no prompt logprobs, in the same steps
ENGINE = dict(device="cpu", sp_min_tokens=8, chunked_prefill_size=16, page_size=8)
GREEDY = dict(temperature=0, max_tokens=3, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The checkpoint and transformers' fp64 log_softmax of every prompt position, and the logits' scale."""
    path = save_tiny_model("llama", str(tmp_path_factory.mktemp("ckpt")))
    ref = hf_model(path)
    out = {}
    with torch.no_grad():
        for ids in (LONG, SHORT):
            logits = ref(torch.tensor([ids])).logits[0].double()
            out[tuple(ids)] = (torch.log_softmax(logits, dim=-1), logits.abs().max().item())
    return path, out


def assert_prompt_logprobs_match(got: list[PromptTokenLogprob | None], ids: list[int], ref, k: int) -> None:
    lp, scale = ref[tuple(ids)]
    tol = dict(atol=1e-4 * scale, rtol=1e-4)
    assert got[0] is None and len(got) == len(ids)
    assert [x.token_id for x in got[1:]] == ids[1:]
    rows = lp[torch.arange(len(ids) - 1)]
    want = rows[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(torch.tensor([x.logprob for x in got[1:]], dtype=torch.double), want, **tol)
    for x, row, target in zip(got[1:], rows, want, strict=True):
        assert len(x.top) == k
        values = torch.tensor([v for _, v in x.top], dtype=torch.double)
        torch.testing.assert_close(values, torch.topk(row, k).values, **tol)  # the k largest...
        torch.testing.assert_close(row[[t for t, _ in x.top]], values, **tol)  # ...of the tokens named
        band = tol["atol"] + tol["rtol"] * target.abs()  # ranks of near ties may differ by rounding
        assert int((row > target + band).sum()) + 1 <= x.rank <= int((row >= target - band).sum())


def run(llm: LLM, requests: list[tuple[list[int], SamplingParams]]) -> tuple[list[list[RequestOutput]], set[str]]:
    """Every output of each request, and the placements its steps used (split, homed, replicated)."""
    engine = llm.engine
    rids = [f"r{i}-{engine.num_steps}" for i in range(len(requests))]
    for rid, (ids, params) in zip(rids, requests, strict=True):
        engine.add_request(GenerateRequest(rid, ids, params))
    outputs: dict[str, list[RequestOutput]] = {rid: [] for rid in rids}
    placements = set()
    while engine.has_unfinished():
        for o in engine.step():
            outputs[o.rid].append(o)
        s = engine.last_step
        placements |= {name for name, n in (("split", s.sp_split), ("homed", s.sp_homed),
                                            ("replicated", s.batch_size - s.sp_split - s.sp_homed)) if n}
    return [outputs[rid] for rid in rids], placements


def prompt_logprobs_of(outputs: list[RequestOutput]) -> list[PromptTokenLogprob | None]:
    """The prompt logprobs, which come once, on the first token's output."""
    assert outputs[0].new_token_ids and all(o.prompt_logprobs is None for o in outputs[1:])
    return outputs[0].prompt_logprobs


@pytest.mark.parametrize("sp,tp", [(1, 1), pytest.param(2, 1, marks=pytest.mark.slow),
                                   pytest.param(2, 2, marks=pytest.mark.slow)])
def test_prompt_logprobs_match_transformers(reference, sp, tp):
    path, ref = reference
    with LLM(path, sp_size=sp, tp_size=tp, **ENGINE) as llm:
        if tp == 1:  # rank 0 alone computes logits: slices smaller than a chunk exercise the slicing
            llm.engine.runner.score_slice_rows = 7
        (long, short, other), placements = run(llm, [
            (LONG, SamplingParams(prompt_logprobs=3, **GREEDY)), (SHORT, SamplingParams(prompt_logprobs=0, **GREEDY)),
            (OTHER, SamplingParams(**GREEDY))])
        assert placements == ({"split", "homed", "replicated"} if sp > 1 else {"homed"})
        assert_prompt_logprobs_match(prompt_logprobs_of(long), LONG, ref, 3)
        assert_prompt_logprobs_match(prompt_logprobs_of(short), SHORT, ref, 0)
        assert all(o.prompt_logprobs is None for o in other)
        # Scoring leaves generation alone: the same tokens as requests without prompt logprobs.
        plain, _ = run(llm, [(LONG, SamplingParams(**GREEDY)), (SHORT, SamplingParams(**GREEDY))])
        assert [[t for o in outs for t in o.new_token_ids] for outs in (long, short)] == \
            [[t for o in outs for t in o.new_token_ids] for outs in plain]


def test_prefix_cache_never_serves_scoring(reference):
    """A cached prefix would leave positions unscored: a request with prompt logprobs computes its whole prompt,
    though the cache holds it (a plain request of the same prompt is served from it)."""
    path, ref = reference
    with LLM(path, **ENGINE) as llm:
        for _ in range(2):
            [outs], _ = run(llm, [(LONG, SamplingParams(prompt_logprobs=2, **GREEDY))])
            assert outs[0].cached_tokens == 0
            assert_prompt_logprobs_match(prompt_logprobs_of(outs), LONG, ref, 2)
        [plain], _ = run(llm, [(LONG, SamplingParams(**GREEDY))])
        assert plain[0].cached_tokens > 0
        # a one-token prompt has nothing to score
        [one] = llm.generate([LONG[:1]], SamplingParams(prompt_logprobs=1, **GREEDY), use_tqdm=False)
        assert one.prompt_logprobs == [None]
