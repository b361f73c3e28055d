"""Structured outputs in the engine (grammar masks on rank 0): every constrained request of a mixed batch returns
text its schema / regex / choice / grammar accepts, checked with ``jsonschema`` and Python's ``re``, at sp = 1
(overlapped steps) and sp = 2 (two ranks, steps not overlapped); the grammar's end finishes a request whatever
``min_tokens`` or ``ignore_eos`` say; logprobs are of the masked distribution; ``after`` frees the output until its
marker; stop strings still cut.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import xgrammar as xgr

from server import LLM, SamplingParams
from server.layers.sampler import apply_token_bitmask
from server.sampling_params import StructuredOutput
from tests.structured_cases import cases, closing_bias, structured_checkpoint

ENGINE = dict(device="cpu", cpu_cache_gb=0.1, page_size=16)
MAX_TOKENS = 300


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return structured_checkpoint(str(tmp_path_factory.mktemp("ckpt")))


def _extra_requests(llm: LLM, bias: dict[int, float]) -> list[tuple[str, SamplingParams]]:
    """Named requests for the checks beyond validity."""
    bang = llm.tokenizer.token_to_id("!")
    yes_no = StructuredOutput("choice", json.dumps(["yes", "no"]))
    return [
        ("logprobs", SamplingParams(temperature=1.0, seed=1, max_tokens=20, logprobs=20, structured=yes_no)),
        ("min_tokens", SamplingParams(temperature=1.0, seed=2, max_tokens=20, min_tokens=10, structured=yes_no)),
        ("ignore_eos", SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, structured=yes_no)),
        ("after", SamplingParams(temperature=1.0, seed=3, max_tokens=40, logit_bias={bang: 30.0},
                                 structured=StructuredOutput("regex", r"[0-9]{3}", after="!"))),
        ("stop", SamplingParams(temperature=1.0, seed=4, max_tokens=40, stop=["-"],
                                structured=StructuredOutput("regex", r"[a-z]{2,6}-[0-9]{2}"))),
        ("json-logprobs", SamplingParams(temperature=0.7, seed=5, max_tokens=MAX_TOKENS, logprobs=2, logit_bias=bias,
                                         structured=StructuredOutput("json", json.dumps(
                                             {"type": "object", "properties": {"ok": {"type": "boolean"}},
                                              "required": ["ok"]})))),
    ]


def _check_extras(llm: LLM, outs: dict) -> None:
    lp = outs["logprobs"]
    assert lp.text in ("yes", "no") and lp.finish_reason == "stop"
    first = lp.logprobs[0]
    allowed = [(t, v) for t, v in first.top if v > -math.inf]
    # the masked distribution: only the tokens that start "yes" or "no" have mass, and they hold all of it
    assert all(any(w.startswith(llm.tokenizer.token_bytes(t)) for w in (b"yes", b"no")) for t, _ in allowed)
    assert math.isclose(sum(math.exp(v) for _, v in allowed), 1.0, rel_tol=1e-4)
    assert first.logprob == dict(first.top)[first.token_id]
    for name in ("min_tokens", "ignore_eos"):
        assert outs[name].text in ("yes", "no") and outs[name].finish_reason == "stop", name
    free, marker, constrained = outs["after"].text.partition("!")
    assert marker == "!" and re.fullmatch(r"[0-9]{3}", constrained), outs["after"].text
    assert outs["stop"].finish_reason == "stop" and re.fullmatch(r"[a-z]{2,6}", outs["stop"].text)
    jl = outs["json-logprobs"]
    assert json.loads(jl.text)["ok"] in (True, False) and len(jl.logprobs) == len(jl.token_ids)
    assert all(x.logprob > -math.inf for x in jl.logprobs)


@pytest.mark.parametrize("sp,graph", [(1, "off"), (2, "off"), (1, "eager")])
def test_constrained_outputs_match_their_constraints(checkpoint, sp, graph):
    """``graph="eager"``: decode in the CUDA-graph form (static buffers, padded rows; run eagerly on CPU), the
    bitmask rows beside the graph's."""
    with LLM(checkpoint, sp_size=sp, cuda_graph=graph, cuda_graph_max_bs=64, **ENGINE) as llm:
        bias = closing_bias(llm.tokenizer)
        battery = cases()
        params = [SamplingParams(temperature=1.0, seed=i, max_tokens=MAX_TOKENS, logit_bias=bias, structured=so)
                  for i, (so, _) in enumerate(battery)]
        extras = _extra_requests(llm, bias)
        unconstrained = SamplingParams(temperature=1.0, seed=99, max_tokens=8, ignore_eos=True)
        outs = llm.generate(["Answer in the format asked:"] * (len(params) + len(extras) + 1),
                            params + [p for _, p in extras] + [unconstrained], use_tqdm=False)
        assert len(battery) >= 40
        for (so, check), out in zip(battery, outs):
            assert out.finish_reason == "stop", (so, out.text)  # the grammar ended it, not max_tokens
            assert check(out.text) is not False, (so, out.text)
        _check_extras(llm, {name: o for (name, _), o in zip(extras, outs[len(params):])})
        assert len(outs[-1].token_ids) == 8  # an unconstrained row of the same batch is unaffected
        assert not llm.engine.grammars.constraints  # every finished request dropped its matcher
        if graph == "eager":
            assert llm.engine.runner.graphs.steps > 0  # the masked rows were decoded in the graph form
        with pytest.raises(ValueError, match="Unclosed"):
            llm.generate("x", SamplingParams(structured=StructuredOutput("regex", "[a-")), use_tqdm=False)
        again = llm.generate("x", SamplingParams(max_tokens=40, structured=StructuredOutput("regex", "ok|fine")),
                             use_tqdm=False)
        assert again[0].text in ("ok", "fine")
        with pytest.raises(ValueError, match="matches no text"):  # an empty language: refused before it runs
            llm.generate("x", SamplingParams(structured=StructuredOutput("regex", "[^\\x00-\\U0010FFFF]")),
                         use_tqdm=False)
        # a dead end after some output: that request ends with an error saying so, its batch-mate is unaffected
        dead, fine = llm.generate(["x", "y"], [
            SamplingParams(max_tokens=20, structured=StructuredOutput("regex", "ab[^\\x00-\\U0010FFFF]")),
            SamplingParams(max_tokens=20, structured=StructuredOutput("regex", "ok|fine"))], use_tqdm=False)
        assert dead.finish_reason == "error" and "matches no text" in dead.error and dead.text == "ab", dead
        assert fine.text in ("ok", "fine") and fine.finish_reason == "stop"


def test_bitmask_matches_xgrammars_own_kernel():
    """Our plain-torch mask against xgrammar's CPU kernel, on a subset of rows and a vocabulary that is not a
    multiple of 32."""
    torch.manual_seed(0)
    logits = torch.randn(5, 77)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 3), dtype=torch.int32)
    rows = [0, 2, 3]
    ours = logits.clone()
    apply_token_bitmask(ours, bitmask, rows)
    every = torch.full((5, 3), -1, dtype=torch.int32)  # all bits set: rows 1 and 4 keep every token
    every[rows] = bitmask
    ref = logits.clone()
    xgr.apply_token_bitmask_inplace(ref, every, backend="cpu")
    assert torch.equal(ours, ref)
    full = logits[:3].clone()
    apply_token_bitmask(full, bitmask, [0, 1, 2])
    ref = logits[:3].clone()
    xgr.apply_token_bitmask_inplace(ref, bitmask, backend="cpu")
    assert torch.equal(full, ref)
