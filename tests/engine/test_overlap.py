"""Overlapped steps (``overlap_schedule``) against the engine that waits for every step's tokens.

With the overlap, a decode row's input token is the previous step's sample, still on the device (rank 0 broadcasts
it to the other ranks), a token that ends a request is known one step late (the request then computes one extra row
that is dropped), and a request's last token by ``max_tokens`` is never followed by another row. Every output
(tokens, logprobs, finish reasons, usage) must equal the non-overlapped engine's, whatever the sampling controls,
and every cache must be freed, also for requests aborted while their token is in flight.
"""

from __future__ import annotations

import pytest

from server import LLM, SamplingParams
from server.messages import GenerateRequest
from tests.helpers import prompt, save_tiny_model

ENGINE = dict(device="cpu", sp_min_tokens=8, chunked_prefill_size=50, page_size=8)


def batch(stop_id: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """Prompts (a long one split over SP, short homed ones) and one sampling control each."""
    prompts = [prompt(77), prompt(5), prompt(40, seed=1), prompt(3, seed=2), prompt(9, seed=3), prompt(12, seed=4),
               prompt(6, seed=5)]
    params = [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id], ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=20, seed=3, repetition_penalty=1.3, frequency_penalty=0.5,
                       max_tokens=16, ignore_eos=True),
        SamplingParams(temperature=0, logprobs=3, max_tokens=1, ignore_eos=True),
        SamplingParams(temperature=0, min_tokens=6, stop_token_ids=[stop_id], max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=11, logprobs=2, presence_penalty=0.4, max_tokens=2, ignore_eos=True),
    ]
    return prompts, params


def summary(outs) -> list[tuple]:
    """Tokens, finish reasons, and the logprobs' token ids; their values separately (fp32: a batch of another
    composition, such as the extra row of a request that just stopped, may round them differently)."""
    return [(o.token_ids, o.finish_reason, [(lp.token_id, [t for t, _ in lp.top]) for lp in o.logprobs or []])
            for o in outs]


def logprob_values(outs) -> list[float]:
    return [v for o in outs for lp in o.logprobs or [] for v in [lp.logprob, *(x for _, x in lp.top)]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt"))
    return {arch: save_tiny_model(arch, root) for arch in ("llama", "minimax_7to1")}


@pytest.mark.parametrize("arch", ["llama", "minimax_7to1"])
@pytest.mark.parametrize("sp,tp,graphs", [(1, 1, "off"), (1, 1, "eager"), (2, 1, "eager"), (2, 2, "off")])
def test_overlapped_steps_give_the_waiting_engines_outputs(checkpoints, arch, sp, tp, graphs):
    kw = dict(ENGINE, sp_size=sp, tp_size=tp, cuda_graph=graphs, cuda_graph_max_bs=8)
    with LLM(checkpoints[arch], overlap_schedule=False, **kw) as llm:
        greedy = llm.generate([prompt(40, seed=1)], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                              use_tqdm=False)[0].token_ids
        stop_id = greedy[9]  # request 2 stops at its 10th token (or earlier, where the id appears before)
        prompts, params = batch(stop_id)
        outs = llm.generate(prompts, params, use_tqdm=False)
        expected, values = summary(outs), logprob_values(outs)
        assert llm.engine.num_prev_token_steps == 0
    assert expected[2][1] == "stop" and expected[0][1] == "length"
    with LLM(checkpoints[arch], overlap_schedule=True, **kw) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert summary(outs) == expected
        assert logprob_values(outs) == pytest.approx(values, rel=1e-4, abs=1e-4)  # as assert_logits_close
        assert llm.engine.num_prev_token_steps > 0  # decode rows did read their tokens on the device
        stats = llm.engine.stats()
        assert stats.kv_pages_used == 0 and stats.state_slots_used == 0


@pytest.mark.parametrize("sp", [1, 2])
def test_abort_with_a_token_in_flight_frees_everything(checkpoints, sp):
    """Requests aborted right after a step (their token still on the device) end with the tokens delivered so
    far; the others go on unchanged; no page or slot stays taken."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = [prompt(77), prompt(5), prompt(20, seed=1)]
    with LLM(checkpoints["minimax_7to1"], **ENGINE, sp_size=sp, enable_prefix_cache=False,
             overlap_schedule=True) as llm:
        expected = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        engine = llm.engine
        for i, p in enumerate(prompts):
            engine.add_request(GenerateRequest(f"r{i}", p, params))
        got: dict[str, list[int]] = {f"r{i}": [] for i in range(3)}
        ends: dict[str, tuple[str, int]] = {}
        steps = 0
        while engine.has_unfinished():
            for o in engine.step():
                got[o.rid] += o.new_token_ids
                if o.finished:
                    ends[o.rid] = (o.finish_reason, o.completion_tokens)
            steps += 1
            if steps == 6:
                assert engine.inflight is not None  # tokens of the step just run are still on the device
                engine.abort_request("r0")
                engine.abort_request("r2")
        assert ends["r0"] == ("abort", len(got["r0"])) and ends["r2"] == ("abort", len(got["r2"]))
        assert got["r0"] == expected[0][: len(got["r0"])] and got["r2"] == expected[2][: len(got["r2"])]
        assert got["r1"] == expected[1] and ends["r1"] == ("length", 40)
        stats = engine.stats()
        assert stats.kv_pages_used == 0 and stats.state_slots_used == 0
