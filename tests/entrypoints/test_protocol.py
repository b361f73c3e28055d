"""Request parsing and sampling-parameter resolution, without a server."""

from __future__ import annotations

import json

import pytest

from server.entrypoints.protocol import (
    SEED_MODULUS,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_generation_prompt,
    chat_messages,
    check_prompt_logprobs,
    completion_prompt_logprobs,
    normalize_prompt,
    parse_body,
    sampling_params_for,
)


def parse(body: dict, model=CompletionRequest):
    return parse_body(json.dumps(body).encode(), model)


def resolve(body: dict, prompt_len: int = 10, n: int = 1, max_model_len: int = 100):
    req = parse({"prompt": "x", **body})
    return sampling_params_for(req, max_tokens=req.max_tokens, logprobs=req.logprobs,
                               prompt_logprobs=completion_prompt_logprobs(req), prompt_len=prompt_len,
                               max_model_len=max_model_len, n=n, vocab_size=50)


def test_strict_types_and_extra_fields():
    assert parse({"prompt": "x", "temperature": 1, "user": "u", "best_of": 1}).temperature == 1.0
    for field, value in [("max_tokens", True), ("max_tokens", "3"), ("temperature", "0.5"), ("echo", 1),
                         ("top_k", 2.5), ("seed", "7"), ("stop", [5]), ("skip_special_tokens", "no")]:
        with pytest.raises(APIError) as e:
            parse({"prompt": "x", field: value})
        assert (e.value.status, e.value.param, e.value.code) == (400, field, "invalid_type"), field
    for field, value, code in [("no_such_field", [1], "unrecognized_parameter"),
                               ("best_of", 2, "unsupported_parameter"),
                               ("best_of", True, "unsupported_parameter"),  # == 1 in Python, not in JSON
                               ("suffix", 0, "unsupported_parameter")]:
        with pytest.raises(APIError) as e:
            parse({"prompt": "x", field: value})
        assert (e.value.status, e.value.param, e.value.code) == (400, field, code)


@pytest.mark.parametrize("raw, code", [
    (b'{"prompt": ' + b"[" * 10000 + b"]" * 10000 + b"}", "invalid_json"),
    (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "invalid_json"),
    (b'{"prompt": "x", "temperature": NaN}', "invalid_json"),
    (b'{"prompt": "x", "temperature": Infinity}', "invalid_json"),
    (b'{"prompt": "\\ud800"}', "invalid_unicode"),
    (b'{"prompt": "\xed\xa0\x80"}', "invalid_unicode"),  # a surrogate encoded in raw UTF-8
    (b'{"model": "\\udfff", "prompt": "x"}', "invalid_unicode"),
    (b'{"prompt": "x"} trailing', "invalid_json"),
])
def test_hostile_json_is_a_400(raw, code):
    with pytest.raises(APIError) as e:
        parse_body(raw, CompletionRequest)
    assert (e.value.status, e.value.code) == (400, code)


@pytest.mark.parametrize("field, value", [("temperature", 1e300), ("temperature", -0.1), ("top_p", 0),
                                          ("seed", 2**64), ("seed", -(2**63) - 1), ("logprobs", 21),
                                          ("stop", ["a"] * 17), ("stop", [""]), ("stop_token_ids", [-1]),
                                          ("n", 0), ("n", 129), ("max_tokens", 0)])
def test_out_of_range_is_a_400_naming_the_field(field, value):
    with pytest.raises(APIError) as e:
        parse({"prompt": "x", field: value})
    assert e.value.status == 400
    assert e.value.param == field or e.value.param.startswith(f"{field}."), e.value.param  # stop_token_ids.0


def test_tiny_temperatures_are_greedy_and_huge_seeds_wrap():
    [p] = resolve({"temperature": 1e-300, "seed": 2**64 - 1})
    assert p.greedy and p.generator_seed == (2**64 - 1) % SEED_MODULUS
    [p] = resolve({"temperature": 1e-5})
    assert not p.greedy


def test_defaults_fill_the_context_and_seeds_wrap():
    [p] = resolve({})
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop) == (90, 1.0, 1.0, -1, None, [])
    params = resolve({"seed": SEED_MODULUS - 1, "top_k": 0, "stop": "\n"}, n=3)
    assert [p.seed for p in params] == [SEED_MODULUS - 1, 0, 1]
    assert all(p.top_k <= 0 and p.stop == ["\n"] for p in params)  # 0 and -1 both disable top-k
    assert resolve({"seed": -1})[0].seed == SEED_MODULUS - 1


@pytest.mark.parametrize("body, prompt_len", [({"max_tokens": 91}, 10), ({}, 100)])
def test_context_length_exceeded(body, prompt_len):
    with pytest.raises(APIError) as e:
        resolve(body, prompt_len=prompt_len)
    assert e.value.code == "context_length_exceeded"
    assert "maximum context length is 100 tokens" in e.value.message


def test_prompt_shapes():
    assert normalize_prompt("a", 50) == ["a"]
    assert normalize_prompt([1, 2], 50) == [[1, 2]]
    assert normalize_prompt([[1], [2, 3]], 50) == [[1], [2, 3]]
    assert normalize_prompt(["a", "b"], 50) == ["a", "b"]
    for bad in ([True, 2], ["a", 1], [[1], "a"], [[]], [50], {"a": 1}, None):
        with pytest.raises(APIError):
            normalize_prompt(bad, 50)


def test_chat_content_forms():
    req = parse({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]},
                              {"role": "assistant", "content": None}]}, ChatCompletionRequest)
    assert chat_messages(req.messages) == [{"role": "user", "content": [{"type": "text", "text": "a"}]},
                                  {"role": "assistant", "content": ""}]
    req = parse({"messages": [{"role": "user", "content": None}]}, ChatCompletionRequest)
    with pytest.raises(APIError) as e:
        chat_messages(req.messages)
    assert e.value.param == "messages.0.content"


def test_logit_controls_reach_sampling_params():
    [p] = resolve({"logit_bias": {"7": -100, "3": 2.5}, "presence_penalty": 0.5, "frequency_penalty": -1,
                   "repetition_penalty": 1.2, "min_p": 0.1})
    assert p.logit_bias == {7: -100.0, 3: 2.5} and p.uses_penalties
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p) == (0.5, -1.0, 1.2, 0.1)
    with pytest.raises(APIError) as e:
        resolve({"logit_bias": {"50": 1}})  # the vocabulary has 50 tokens: ids 0..49
    assert (e.value.param, e.value.code) == ("logit_bias", "invalid_token_id")


def test_chat_generation_prompt_as_vllm():
    assert chat_generation_prompt(None, None) == (True, False)
    assert chat_generation_prompt(False, None) == (False, False)
    assert chat_generation_prompt(None, True) == (False, True)
    assert chat_generation_prompt(False, True) == (False, True)
    with pytest.raises(APIError):
        chat_generation_prompt(True, True)


def test_prompt_logprobs_resolution():
    """Echo with logprobs scores the prompt; with prompt_logprobs too, the engine computes the larger k (each answer
    is trimmed to its own); prompt_logprobs is refused with stream (vLLM's rule), in range like logprobs."""
    assert [p.prompt_logprobs for p in resolve({"echo": True})] == [None]
    assert [p.prompt_logprobs for p in resolve({"logprobs": 2})] == [None]
    assert [p.prompt_logprobs for p in resolve({"echo": True, "logprobs": 2}, n=2)] == [2, 2]
    assert resolve({"echo": True, "logprobs": 2, "prompt_logprobs": 5})[0].prompt_logprobs == 5
    assert resolve({"echo": True, "logprobs": 4, "prompt_logprobs": 0})[0].prompt_logprobs == 4
    for body, model in (({"prompt": "x"}, CompletionRequest), ({"messages": [{"role": "user", "content": "x"}]},
                                                                ChatCompletionRequest)):
        check_prompt_logprobs(parse({**body, "prompt_logprobs": 1}, model))
        with pytest.raises(APIError) as e:
            check_prompt_logprobs(parse({**body, "prompt_logprobs": 0, "stream": True}, model))
        assert (e.value.status, e.value.param) == (400, "prompt_logprobs")
        for value, code in ((21, "invalid_value"), (-1, "invalid_value"), ("1", "invalid_type"), (1.0, "invalid_type")):
            with pytest.raises(APIError) as e:
                parse({**body, "prompt_logprobs": value}, model)
            assert (e.value.status, e.value.param, e.value.code) == (400, "prompt_logprobs", code)
