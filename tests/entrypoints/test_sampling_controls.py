"""Penalties, logit_bias and min_p of a real ``launch_server.py`` (built-in model, CPU) against a reference: the
model's own logits at every step (the offline engine's ``prompt_logits`` on prompt + the tokens generated so far)
with the documented formula applied here, token by token."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from server import LLM
from server.models.builtin import builtin_model_path
from server.tokenizer import Tokenizer
from tests.helpers import openai_client

PROMPT = "The town sits where two rivers meet, and the town"
STEPS = 8
TIE = 1e-3  # steps whose two best adjusted logits are closer than this may pick either (float noise)


@pytest.fixture(scope="module")
def server(builtin_server):
    return builtin_server  # shared by the modules that need no flags of their own (tests/entrypoints/conftest.py)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai_client(server)


@pytest.fixture(scope="module")
def offline():
    llm = LLM(device="cpu", cpu_cache_gb=0.05)
    yield llm
    llm.engine.shutdown()


@pytest.fixture(scope="module")
def prompt_ids() -> list[int]:
    return Tokenizer.from_pretrained(builtin_model_path()).encode(PROMPT)


def adjusted(logits: torch.Tensor, prompt: list[int], output: list[int], bias: dict[int, float] | None = None,
             presence: float = 0.0, frequency: float = 0.0, repetition: float = 1.0) -> torch.Tensor:
    """The formulas of docs/server.md, one token at a time, in float64."""
    x = logits.double().clone()
    for t, b in (bias or {}).items():
        x[t] += b
    for t in set(prompt) | set(output):
        if repetition != 1.0:
            x[t] = x[t] / repetition if x[t] > 0 else x[t] * repetition
    for t in set(output):
        x[t] -= frequency * output.count(t) + presence
    return x


def step_logits(offline: LLM, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The model's logits before each of ``tokens``: one causal pass over prompt + tokens gives them all."""
    return offline.engine.prompt_logits(prompt + tokens)[len(prompt) - 1 : -1]


def check_against_reference(offline: LLM, prompt: list[int], tokens: list[int], logprobs: list[float],
                            **controls) -> None:
    """Each greedy token is the argmax of the adjusted logits, and its logprob is theirs."""
    for j, (tok, lp, logits) in enumerate(zip(tokens, logprobs, step_logits(offline, prompt, tokens), strict=True)):
        x = adjusted(logits, prompt, tokens[:j], **controls)
        top2 = torch.topk(x, 2).values
        if top2[0] - top2[1] > TIE:
            assert tok == int(torch.argmax(x)), (j, controls)
        assert lp == pytest.approx(torch.log_softmax(x, -1)[tok].item(), abs=2e-3), (j, controls)


def completion(server, prompt_ids: list[int], **body) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs via the native API, which returns token ids."""
    r = httpx.post(f"{server.url}/generate", timeout=120, json={
        "input_ids": prompt_ids, "return_logprob": True,
        "sampling_params": {"temperature": 0, "max_new_tokens": STEPS, "ignore_eos": True, **body}})
    assert r.status_code == 200, r.text
    entries = r.json()["meta_info"]["output_token_logprobs"]
    return [t for _, t, _ in entries], [lp for lp, _, _ in entries]


@pytest.mark.parametrize("controls", [
    {"frequency_penalty": 2.0},
    {"presence_penalty": -2.0},
    {"frequency_penalty": -1.5, "presence_penalty": 1.0},
    {"repetition_penalty": 1.8},
    {"repetition_penalty": 0.4},
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_penalties_match_the_reference(server, offline, prompt_ids, controls):
    plain, _ = completion(server, prompt_ids)
    tokens, logprobs = completion(server, prompt_ids, **controls)
    names = {"frequency_penalty": "frequency", "presence_penalty": "presence", "repetition_penalty": "repetition"}
    check_against_reference(offline, prompt_ids, tokens, logprobs, **{names[k]: v for k, v in controls.items()})
    if controls.get("presence_penalty", 0) < 0 or controls.get("repetition_penalty", 1) < 1:
        assert tokens != plain  # encouraging repetition changes a flat random model's greedy output


def test_openai_sdk_penalties_and_logit_bias(client, server, offline, prompt_ids):
    """The SDK's own fields, on chat and completions: logit_bias (string keys) forces and bans tokens."""
    plain, _ = completion(server, prompt_ids)
    forced = plain[1]
    out = client.completions.create(model="builtin", prompt=prompt_ids, max_tokens=STEPS, temperature=0, logprobs=0,
                                    logit_bias={str(forced): 100, str(plain[0]): -100}, frequency_penalty=0.5,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    tokens, _ = completion(server, prompt_ids, logit_bias={str(forced): 100, str(plain[0]): -100},
                           frequency_penalty=0.5)
    assert "".join(lp.tokens) == out.choices[0].text
    check_against_reference(offline, prompt_ids, tokens, lp.token_logprobs,
                            bias={forced: 100.0, plain[0]: -100.0}, frequency=0.5)
    # +100 beats everything until the frequency penalty has pushed the forced token below the next one.
    assert tokens[0] == forced and plain[0] not in tokens
    chat = client.chat.completions.create(model="builtin", messages=[{"role": "user", "content": "Hi"}],
                                          max_completion_tokens=3, temperature=0, logit_bias={str(forced): 100},
                                          presence_penalty=0.0, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == Tokenizer.from_pretrained(builtin_model_path()).decode([forced] * 3)


def test_min_p_keeps_only_likely_tokens(server, offline, prompt_ids):
    """Sampled (seeded) tokens all have a probability of at least min_p x the best token's, at temperature 1."""
    for seed in range(4):
        tokens, _ = completion(server, prompt_ids, temperature=1.0, min_p=0.9, sampling_seed=seed,
                               max_new_tokens=4)
        for j, (tok, logits) in enumerate(zip(tokens, step_logits(offline, prompt_ids, tokens), strict=True)):
            probs = torch.softmax(logits.double(), -1)
            assert probs[tok] >= 0.9 * probs.max() - 1e-6, (seed, j)
    # Without min_p the same seeds reach unlikely tokens: the check above can fail.
    probs = torch.softmax(offline.engine.prompt_logits(prompt_ids)[-1].double(), -1)
    firsts = [completion(server, prompt_ids, temperature=1.0, sampling_seed=seed, max_new_tokens=1)[0][0]
              for seed in range(4)]
    assert any(probs[t] < 0.9 * probs.max() for t in firsts)
