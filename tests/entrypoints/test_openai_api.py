"""The OpenAI API of a real ``launch_server.py`` (built-in model, CPU), driven by the official ``openai`` client
and by raw HTTP; greedy outputs are checked against the offline ``LLM`` API on the same model."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from server import LLM, SamplingParams
from server.models.builtin import builtin_model_path
from server.tokenizer import Tokenizer
from tests.helpers import REPO, openai_client, prometheus_value, sse_events

PROMPTS = ["The town sits where", "Questions about the ferry", "Bread is baked", "A good soup needs onions"]
CACHE_GB = "0.25"  # the shared server's (tests/entrypoints/conftest.py): the offline engine matches it


@pytest.fixture(scope="module")
def server(builtin_server):
    return builtin_server  # shared by the modules that need no flags of their own (tests/entrypoints/conftest.py)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai_client(server)


@pytest.fixture(scope="module")
def offline():
    llm = LLM(device="cpu", cpu_cache_gb=float(CACHE_GB))
    yield llm
    llm.engine.shutdown()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_pretrained(builtin_model_path())


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def test_health_and_models(server, client):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == ["builtin"]
    assert models.data[0].model_extra["max_model_len"] == 8192


def test_completions_greedy_match_offline_llm(client, offline):
    ref = offline.generate(PROMPTS, greedy(12), use_tqdm=False)
    for prompt, want in zip(PROMPTS, ref, strict=True):
        out = client.completions.create(model="builtin", prompt=prompt, max_tokens=12, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == want.text
        assert out.choices[0].finish_reason == "length"
        assert out.usage.completion_tokens == 12
        assert out.usage.prompt_tokens == len(want.prompt_token_ids)
    # A list of prompts in one request gives one choice per prompt, in order.
    out = client.completions.create(model="builtin", prompt=PROMPTS, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == list(range(len(PROMPTS)))
    assert [c.text for c in out.choices] == [r.text for r in ref]
    assert out.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in ref)


def test_token_id_prompts_and_native_generate(server, client, offline, tokenizer):
    ids = [tokenizer.encode(p) for p in PROMPTS[:2]]
    ref = offline.generate(ids, greedy(8), use_tqdm=False)
    out = client.completions.create(model="builtin", prompt=ids, max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert [c.text for c in out.choices] == [r.text for r in ref]
    body = {"input_ids": ids[0], "sampling_params": {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}}
    native = httpx.post(f"{server.url}/generate", json=body, timeout=60).json()
    assert native["output_ids"] == ref[0].token_ids
    assert native["text"] == ref[0].text
    assert native["meta_info"]["finish_reason"] == {"type": "length", "length": 8}


def test_return_token_ids_whole_and_streamed(server, offline, tokenizer):
    """vLLM's ``return_token_ids``: a whole response's choices carry the prompt's and the completion's ids; a
    stream's first chunk of a choice carries the prompt's ids and its chunks together carry every completion id,
    in order, as the offline LLM generates them."""
    ref = offline.generate(PROMPTS[:2], greedy(9), use_tqdm=False)
    body = {"model": "builtin", "prompt": PROMPTS[:2], "max_tokens": 9, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    whole = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    for choice, want in zip(whole["choices"], ref, strict=True):
        assert choice["prompt_token_ids"] == want.prompt_token_ids
        assert choice["token_ids"] == want.token_ids
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        events = [json.loads(e) for e in sse_events(r.read())]
    for i, want in enumerate(ref):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == i]
        assert mine[0]["prompt_token_ids"] == want.prompt_token_ids
        assert all("prompt_token_ids" not in c for c in mine[1:])
        assert [t for c in mine for t in c["token_ids"]] == want.token_ids
        assert "".join(c["text"] for c in mine) == want.text
    # Without the field, chunks have no ids (OpenAI's shape).
    plain = httpx.post(f"{server.url}/v1/completions", json={**body, "return_token_ids": None}, timeout=60).json()
    assert "token_ids" not in plain["choices"][0]


def test_chat_return_token_ids(server, offline, tokenizer):
    """Chat (vLLM's places): the response's ``prompt_token_ids`` are the rendered template's ids, each choice's
    ``token_ids`` its completion; streamed, the first chunk has the prompt's ids and the choice chunks together
    every completion id."""
    messages = [{"role": "user", "content": "Where is the library?"}]
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    want = offline.generate([prompt], greedy(7), use_tqdm=False)[0]
    body = {"model": "builtin", "messages": messages, "max_tokens": 7, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    whole = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()
    assert whole["prompt_token_ids"] == prompt
    assert whole["choices"][0]["token_ids"] == want.token_ids
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        events = [json.loads(e) for e in sse_events(r.read())]
    assert events[0]["prompt_token_ids"] == prompt and all("prompt_token_ids" not in e for e in events[1:])
    assert [t for e in events for t in e["choices"][0]["token_ids"]] == want.token_ids
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == want.text


def test_chat_streaming_and_not(client, offline, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is the library?"}]
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    [ref] = offline.generate([prompt], greedy(10), use_tqdm=False)
    out = client.chat.completions.create(model="builtin", messages=messages, max_completion_tokens=10,
                                         temperature=0, extra_body={"ignore_eos": True})
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.text
    assert out.usage.prompt_tokens == len(prompt) and out.usage.completion_tokens == 10

    chunks = list(client.chat.completions.create(
        model="builtin", messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_text_parts_are_joined_by_newlines(client):
    kw = dict(model="builtin", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    parts = [{"type": "text", "text": "Where is"}, {"type": "text", "text": "the library?"}]
    a = client.chat.completions.create(messages=[{"role": "user", "content": parts}], **kw)
    b = client.chat.completions.create(messages=[{"role": "user", "content": "Where is\nthe library?"}], **kw)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    assert a.choices[0].message.content == b.choices[0].message.content


def test_sse_framing_raw(server):
    body = {"model": "builtin", "prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(e) for e in sse_events(r.read())]
    assert all(e["object"] == "text_completion" and "usage" not in e for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])


def test_n_choices_and_seeds(client):
    kw = dict(model="builtin", prompt=PROMPTS[1], max_tokens=10, temperature=1.0, extra_body={"ignore_eos": True})
    a = client.completions.create(n=3, seed=1234, **kw)
    b = client.completions.create(n=3, seed=1234, **kw)
    c = client.completions.create(n=3, seed=99, **kw)
    assert [x.index for x in a.choices] == [0, 1, 2]
    assert [x.text for x in a.choices] == [x.text for x in b.choices]
    assert len({x.text for x in a.choices}) == 3  # seed + i per choice
    assert [x.text for x in a.choices] != [x.text for x in c.choices]
    assert a.usage.completion_tokens == 30
    # Choice 0 with seed s is the single request with seed s.
    single = client.completions.create(n=1, seed=1234, **kw)
    assert single.choices[0].text == a.choices[0].text

    chat = client.chat.completions.create(model="builtin", messages=[{"role": "user", "content": "Hi"}], n=2,
                                          seed=5, max_tokens=6, stream=True, extra_body={"ignore_eos": True})
    finished = {}
    for chunk in chat:
        for ch in chunk.choices:
            if ch.finish_reason:
                finished[ch.index] = ch.finish_reason
    assert finished == {0: "length", 1: "length"}


def test_readme_first_curl_works_against_the_builtin_model(server):
    """The README's first screen: the built-in model's nature, its name, and a curl for it that works."""
    readme = (REPO / "README.md").read_text()
    first_screen = readme[:readme.index("## What is in it")]
    assert "random weights" in first_screen and "`builtin`" in first_screen
    m = re.search(r"curl localhost:30000(/v1/\S+) .*?-d '(\{.*?\})'", first_screen, re.S)
    path, body = m.group(1), json.loads(m.group(2))
    assert body["model"] == "builtin"
    r = httpx.post(f"{server.url}{path}", json=body, timeout=120)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text


def test_offline_n_matches_the_servers_choices(client, offline):
    """SamplingParams.n: one CompletionOutput per prompt, its ``outputs`` the n completions, seeded seed + i as the
    server seeds a request's choices."""
    outs = offline.generate([PROMPTS[1], PROMPTS[2]], [SamplingParams(n=2, seed=77, max_tokens=4, ignore_eos=True),
                                                       greedy(2)], use_tqdm=False)
    assert [len(o.outputs) for o in outs] == [2, 1] and all(o.outputs[0] is o for o in outs)
    served = client.completions.create(model="builtin", prompt=PROMPTS[1], n=2, seed=77, max_tokens=4,
                                       temperature=1.0, extra_body={"ignore_eos": True})
    assert [o.text for o in outs[0].outputs] == [c.text for c in served.choices]
    assert outs[0].outputs[0].text != outs[0].outputs[1].text
    with pytest.raises(ValueError, match="n"):
        SamplingParams(n=0)


def test_offline_chat_matches_the_servers_chat(client, offline, tokenizer):
    """LLM.chat renders with the model's chat template as /v1/chat/completions does: the same greedy reply; one
    conversation or a list of them; chat_template and chat_template_kwargs reach the template."""
    conversations = [[{"role": "user", "content": "Where is the ferry?"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Bread?"}]]
    outs = offline.chat(conversations, greedy(4), use_tqdm=False)
    for conversation, out in zip(conversations, outs, strict=True):
        served = client.chat.completions.create(model="builtin", messages=conversation, max_tokens=4, temperature=0,
                                                extra_body={"ignore_eos": True})
        assert out.text == served.choices[0].message.content
        assert out.prompt_token_ids == tokenizer.encode_chat(conversation)
    [one] = offline.chat(conversations[0], greedy(1), use_tqdm=False)
    assert one.token_ids == outs[0].token_ids[:1]
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ suffix }}"
    [custom] = offline.chat(conversations[0], greedy(1), use_tqdm=False, chat_template=template,
                            chat_template_kwargs={"suffix": " Answer:"})
    assert custom.prompt == "Where is the ferry? Answer:"
    assert custom.prompt_token_ids == tokenizer.encode("Where is the ferry? Answer:", add_special_tokens=False)


def test_stop_strings(server, client, offline):
    [full] = offline.generate([PROMPTS[2]], greedy(24), use_tqdm=False)
    words = full.text.split()
    stop = next(w for w in words[2:] if full.text.index(w) > 0)
    want = full.text[: full.text.index(stop)]
    kw = dict(model="builtin", prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=[stop, "\u2603never"],
              extra_body={"ignore_eos": True})
    out = client.completions.create(**kw)
    assert out.choices[0].text == want
    assert out.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed) == want
    assert streamed[-1].choices[0].finish_reason == "stop"
    # The engine was told to abort: nothing keeps running or holding cache pages.
    assert _wait_idle(server)


def test_logprobs(client, offline):
    [ref] = offline.generate([PROMPTS[3]], greedy(6, logprobs=3), use_tqdm=False)
    out = client.completions.create(model="builtin", prompt=PROMPTS[3], max_tokens=6, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert lp.token_logprobs == pytest.approx([x.logprob for x in ref.logprobs], abs=1e-5)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 3
        assert chosen == pytest.approx(max(top.values()), abs=1e-6)  # greedy picks the most likely token
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)

    chat = client.chat.completions.create(model="builtin", messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-6)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token  # a lone byte decodes to U+FFFD


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _check_vllm_prompt_logprobs(got: list, ref: list, k: int, tokenizer: Tokenizer) -> None:
    """vLLM's shape: null, then per token {"id": {logprob, rank, decoded_token}}, the token itself first."""
    assert got[0] is None and len(got) == len(ref)
    for entry, x in zip(got[1:], ref[1:], strict=True):
        want = {str(x.token_id): (x.logprob, x.rank)}
        for rank, (t, v) in enumerate(x.top[:k], start=1):
            want.setdefault(str(t), (v, rank))
        assert list(entry) == list(want)
        for key, e in entry.items():
            assert e["logprob"] == pytest.approx(want[key][0], abs=1e-5) and e["rank"] == want[key][1]
            assert e["decoded_token"] == _token_text(tokenizer, int(key))


def test_echo_with_logprobs(server, client, offline, tokenizer):
    """OpenAI's legacy echo + logprobs: the prompt's tokens first (null for the first, which follows nothing), with
    the offline engine's prompt logprobs, then the completion's; a stream's echo chunk carries the prompt's. With
    vLLM's prompt_logprobs too, each answer has its own number of alternatives."""
    ids = tokenizer.encode(PROMPTS[1])
    n = len(ids)
    [ref] = offline.generate([ids], greedy(4, logprobs=2, prompt_logprobs=4), use_tqdm=False)
    kw = dict(model="builtin", prompt=PROMPTS[1], max_tokens=4, temperature=0, logprobs=2, echo=True)
    choice = client.completions.create(**kw, extra_body={"ignore_eos": True, "prompt_logprobs": 4}).choices[0]
    _check_vllm_prompt_logprobs(choice.model_extra["prompt_logprobs"], ref.prompt_logprobs, 4, tokenizer)
    assert choice.text == PROMPTS[1] + ref.text
    lp = choice.logprobs
    assert lp.tokens == [_token_text(tokenizer, t) for t in ids + ref.token_ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([x.logprob for x in ref.prompt_logprobs[1:] + ref.logprobs],
                                                  abs=1e-5)
    for top, x in zip(lp.top_logprobs[1:], ref.prompt_logprobs[1:] + ref.logprobs, strict=True):
        want = {_token_text(tokenizer, t): v for t, v in x.top[:2]} | {_token_text(tokenizer, x.token_id): x.logprob}
        assert top == pytest.approx(want, abs=1e-5)  # the top 2 and the token itself
    prompt_offsets = [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    assert lp.text_offset[:n] == prompt_offsets and lp.text_offset[n] == len(PROMPTS[1])

    body = kw | {"ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        chunks = [json.loads(e)["choices"][0] for e in sse_events(r.read())]
    assert chunks[0]["text"] == PROMPTS[1] and len(chunks[0]["logprobs"]["tokens"]) == n
    streamed = {key: [x for c in chunks for x in c["logprobs"][key]] for key in lp.model_dump()}
    assert streamed == lp.model_dump()
    assert "".join(c["text"] for c in chunks) == choice.text


def test_vllm_prompt_logprobs(server, offline, tokenizer):
    """``prompt_logprobs`` on completions (every choice) and on chat (the response's), as vLLM answers them."""
    ids = tokenizer.encode(PROMPTS[2])
    [ref] = offline.generate([ids], greedy(3, prompt_logprobs=3), use_tqdm=False)
    body = {"model": "builtin", "prompt": PROMPTS[2], "max_tokens": 3, "temperature": 0, "ignore_eos": True,
            "prompt_logprobs": 3, "n": 2}
    out = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    for choice in out["choices"]:
        assert choice["text"] == ref.text and choice["logprobs"] is None
        _check_vllm_prompt_logprobs(choice["prompt_logprobs"], ref.prompt_logprobs, 3, tokenizer)

    messages = [{"role": "user", "content": "Where is the library?"}]
    chat_ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    [cref] = offline.generate([chat_ids], greedy(2, prompt_logprobs=0), use_tqdm=False)
    chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "model": "builtin", "messages": messages, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 0}).json()
    assert "prompt_logprobs" not in chat["choices"][0]
    _check_vllm_prompt_logprobs(chat["prompt_logprobs"], cref.prompt_logprobs, 0, tokenizer)


def test_generate_input_token_logprobs(server, offline, tokenizer):
    """SGLang's ``logprob_start_len``: the prompt's tokens from there on, ``[logprob or null, id, text]``, and their
    top lists; streamed, the last chunk has the same."""
    ids = tokenizer.encode(PROMPTS[3])
    [ref] = offline.generate([ids], greedy(3, logprobs=2, prompt_logprobs=2), use_tqdm=False)
    for start in (0, 3):
        body = {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": 3, "ignore_eos": True},
                "return_logprob": True, "logprob_start_len": start, "top_logprobs_num": 2,
                "return_text_in_logprobs": True}
        meta = httpx.post(f"{server.url}/generate", json=body, timeout=60).json()["meta_info"]
        want = ref.prompt_logprobs[start:]
        got = meta["input_token_logprobs"]
        assert [(t, text) for _, t, text in got] == [(t, _token_text(tokenizer, t)) for t in ids[start:]]
        assert [v is None for v, _, _ in got] == [x is None for x in want] == [p == 0 for p in range(start, len(ids))]
        assert [v for v, _, _ in got if v is not None] == pytest.approx(
            [x.logprob for x in want if x is not None], abs=1e-5)
        tops = meta["input_top_logprobs"]
        assert len(tops) == len(want)
        for top, x in zip(tops, want, strict=True):
            assert top is None if x is None else [t for _, t, _ in top] == [t for t, _ in x.top]
        assert [t for _, t, _ in meta["output_token_logprobs"]] == ref.token_ids
        events = [json.loads(e) for e in sse_events(httpx.post(f"{server.url}/generate", json={**body, "stream": True},
                                                               timeout=60).content)]
        assert events[-1]["meta_info"]["input_token_logprobs"] == got


def test_echo_and_extra_fields(server, client):
    # Fields that do not change the output, and unimplemented ones at their neutral value, are accepted.
    out = client.completions.create(model="builtin", prompt=PROMPTS[0], max_tokens=3, echo=True, temperature=0,
                                    user="me", best_of=1, extra_body={"metadata": {"k": "v"}})
    assert out.choices[0].text.startswith(PROMPTS[0])
    # Anything else is refused by name: a field the server does not know, or one it would silently ignore.
    for extra, code in (({"frobnicate": {"x": 1}}, "unrecognized_parameter"),
                        ({"best_of": 2}, "unsupported_parameter")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="builtin", prompt="hi", max_tokens=1, extra_body=extra)
        assert e.value.body["param"] == next(iter(extra)) and e.value.body["code"] == code


async def _stream_one(http: httpx.AsyncClient, prompt: str) -> str:
    body = {"model": "builtin", "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True,
            "ignore_eos": True}
    async with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        events = [json.loads(e) for e in sse_events(await r.aread())]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    return "".join(e["choices"][0]["text"] for e in events)


def test_32_concurrent_streams_match_sequential(server):
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(32)]

    async def run_all() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as http:
            return await asyncio.gather(*(_stream_one(http, p) for p in prompts))

    concurrent = asyncio.run(run_all())
    sequential = []
    for p in prompts:
        body = {"model": "builtin", "prompt": p, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        sequential.append(r.json()["choices"][0]["text"])
    assert concurrent == sequential


def _metrics(server) -> str:
    return httpx.get(f"{server.url}/metrics", timeout=10).text


def _wait_idle(server, kv_pages: float = 0.0, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = _metrics(server)
        if (prometheus_value(m, "server_num_requests_running") == 0
                and prometheus_value(m, "server_num_requests_waiting") == 0
                and prometheus_value(m, "server_requests_in_flight") == 0
                and prometheus_value(m, "server_kv_cache_pages_used") == kv_pages
                and prometheus_value(m, "server_state_pool_slots_used") == 0):
            return True
        time.sleep(0.2)
    return False


def test_client_disconnect_frees_the_request(server):
    assert _wait_idle(server)
    before = prometheus_value(_metrics(server), "server_kv_cache_pages_used")
    body = {"model": "builtin", "prompt": PROMPTS[0] * 20, "max_tokens": 4000, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(3):
                assert next(lines).startswith("data: ")
                next(lines)
            m = _metrics(server)
            assert prometheus_value(m, "server_num_requests_running") == 1
            assert prometheus_value(m, "server_kv_cache_pages_used") > before
    assert _wait_idle(server, before)  # the stream was closed mid-way: the engine aborted it and freed its pages
    # The same for a non-streaming request whose client gives up.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False}, timeout=2)
    assert _wait_idle(server, before)
    m = _metrics(server)
    assert prometheus_value(m, "server_requests_total{finish_reason=\"abort\"}") >= 2


def test_a_compressed_body_is_415(server):
    import gzip

    body = gzip.compress(json.dumps(GOOD).encode())
    r = httpx.post(f"{server.url}/v1/completions", content=body, timeout=60,
                   headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_content_encoding", r.text
    r = httpx.post(f"{server.url}/v1/completions", content=json.dumps(GOOD).encode(), timeout=60,
                   headers={"Content-Type": "application/json", "Content-Encoding": "identity"})
    assert r.status_code == 200, r.text


def test_a_body_cut_short_is_no_server_error(server):
    """A client that closes the connection in the middle of its request body: nothing was accepted, the log gets no
    traceback, the server goes on."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(server.url)
    for _ in range(3):
        with socket.create_connection((url.hostname, url.port), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"pro")
    assert httpx.post(f"{server.url}/v1/completions", json=GOOD, timeout=60).status_code == 200
    assert "ClientDisconnect" not in server.log() and "unexpected error" not in server.log()


def test_metrics_exposition(server):
    r = httpx.get(f"{server.url}/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = r.text
    assert prometheus_value(m, "server_generation_tokens_total") > 0
    assert prometheus_value(m, "server_time_to_first_token_seconds_count") > 0
    assert prometheus_value(m, "server_inter_token_latency_seconds_count") > 0
    assert prometheus_value(m, "server_kv_cache_pages_total") > 0
    assert prometheus_value(m, "server_state_pool_slots_total") > 0
    assert prometheus_value(m, "server_engine_healthy") == 1
    assert 'server_time_to_first_token_seconds_bucket{le="+Inf"}' in m


GOOD = {"model": "builtin", "prompt": "hi", "max_tokens": 1}
CHAT = {"model": "builtin", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
BAD_INPUTS = {
    # id: (method, path, body (bytes = raw), status, param, code)
    "malformed-json": ("POST", "/v1/completions", b'{"prompt": "hi",', 400, None, "invalid_json"),
    "body-not-object": ("POST", "/v1/completions", b"[1, 2]", 400, None, None),
    "json-nested-10000-deep": ("POST", "/v1/completions", b'{"prompt": ' + b"[" * 10000 + b"]" * 10000 + b"}", 400,
                               None, "invalid_json"),
    "integer-5000-digits": ("POST", "/v1/completions", b'{"prompt": "hi", "seed": ' + b"7" * 5000 + b"}", 400, None,
                            "invalid_json"),
    "nan-temperature": ("POST", "/v1/completions", b'{"prompt": "hi", "temperature": NaN}', 400, None,
                        "invalid_json"),
    "lone-surrogate-prompt": ("POST", "/v1/completions", b'{"prompt": "a\\ud800b"}', 400, None, "invalid_unicode"),
    "lone-surrogate-chat": ("POST", "/v1/chat/completions",
                            b'{"messages": [{"role": "user", "content": "\\udc00"}]}', 400, None, "invalid_unicode"),
    "lone-surrogate-model": ("POST", "/v1/completions", b'{"model": "\\ud800", "prompt": "hi"}', 400, None,
                             "invalid_unicode"),
    "raw-utf8-surrogate": ("POST", "/v1/completions", b'{"prompt": "\xed\xa0\x80"}', 400, None, "invalid_unicode"),
    "invalid-utf8": ("POST", "/v1/completions", b'{"prompt": "\xff\xfe"}', 400, None, "invalid_json"),
    "missing-prompt": ("POST", "/v1/completions", {"model": "builtin"}, 400, "prompt", None),
    "missing-messages": ("POST", "/v1/chat/completions", {"model": "builtin"}, 400, "messages", None),
    "negative-max-tokens": ("POST", "/v1/completions", {**GOOD, "max_tokens": -5}, 400, "max_tokens",
                            "invalid_value"),
    "zero-max-tokens": ("POST", "/v1/completions", {**GOOD, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    "huge-max-tokens": ("POST", "/v1/completions", {**GOOD, "max_tokens": 10**9}, 400, "prompt",
                        "context_length_exceeded"),
    "max-tokens-string": ("POST", "/v1/completions", {**GOOD, "max_tokens": "ten"}, 400, "max_tokens",
                          "invalid_type"),
    "max-tokens-float": ("POST", "/v1/completions", {**GOOD, "max_tokens": 2.5}, 400, "max_tokens", "invalid_type"),
    "negative-temperature": ("POST", "/v1/completions", {**GOOD, "temperature": -0.1}, 400, "temperature",
                             "invalid_value"),
    "huge-temperature": ("POST", "/v1/completions", {**GOOD, "temperature": 1e300}, 400, "temperature",
                         "invalid_value"),
    "temperature-string": ("POST", "/v1/completions", {**GOOD, "temperature": "hot"}, 400, "temperature",
                           "invalid_type"),
    "top-p-zero": ("POST", "/v1/completions", {**GOOD, "top_p": 0}, 400, "top_p", "invalid_value"),
    "top-p-above-one": ("POST", "/v1/completions", {**GOOD, "top_p": 1.5}, 400, "top_p", "invalid_value"),
    "top-k-negative": ("POST", "/v1/completions", {**GOOD, "top_k": -3}, 400, "top_k", "invalid_value"),
    "top-k-float": ("POST", "/v1/completions", {**GOOD, "top_k": 2.5}, 400, "top_k", "invalid_type"),
    "seed-string": ("POST", "/v1/completions", {**GOOD, "seed": "42"}, 400, "seed", "invalid_type"),
    "seed-2**64": ("POST", "/v1/completions", {**GOOD, "seed": 2**64}, 400, "seed", "invalid_value"),
    "n-zero": ("POST", "/v1/completions", {**GOOD, "n": 0}, 400, "n", "invalid_value"),
    "n-too-many-for-the-server": ("POST", "/v1/completions", {**GOOD, "n": 128, "prompt": ["a"] * 10}, 400, "n",
                                  "too_many_completions"),
    "token-id-too-large": ("POST", "/v1/completions", {**GOOD, "prompt": [5, 10**7]}, 400, "prompt",
                           "invalid_token_id"),
    "token-id-negative": ("POST", "/v1/completions", {**GOOD, "prompt": [[5, -1]]}, 400, "prompt",
                          "invalid_token_id"),
    "mixed-prompt-list": ("POST", "/v1/completions", {**GOOD, "prompt": ["a", 5]}, 400, "prompt", None),
    "empty-prompt": ("POST", "/v1/completions", {**GOOD, "prompt": ""}, 400, "prompt", None),
    "empty-prompt-list": ("POST", "/v1/completions", {**GOOD, "prompt": []}, 400, "prompt", None),
    "ten-thousand-prompts": ("POST", "/v1/completions", {**GOOD, "prompt": ["a"] * 10000}, 400, "prompt", None),
    "unknown-model": ("POST", "/v1/completions", {**GOOD, "model": "gpt-17"}, 404, "model", "model_not_found"),
    "prompt-over-context": ("POST", "/v1/completions", {**GOOD, "prompt": [7] * 8192}, 400, "prompt",
                            "context_length_exceeded"),
    "stop-not-string": ("POST", "/v1/completions", {**GOOD, "stop": 5}, 400, "stop", "invalid_type"),
    "stop-list-of-ints": ("POST", "/v1/completions", {**GOOD, "stop": [5]}, 400, "stop", "invalid_type"),
    "stop-token-ids-not-list": ("POST", "/v1/completions", {**GOOD, "stop_token_ids": 5}, 400, "stop_token_ids",
                                "invalid_type"),
    "stop-token-id-beyond-vocab": ("POST", "/v1/completions", {**GOOD, "stop_token_ids": [10**6], "min_tokens": 1},
                                   400, "stop_token_ids", "invalid_token_id"),
    "min-tokens-over-max": ("POST", "/v1/completions", {**GOOD, "min_tokens": 3}, 400, "min_tokens", None),
    "logprobs-too-many": ("POST", "/v1/completions", {**GOOD, "logprobs": 21}, 400, "logprobs", "invalid_value"),
    "logprobs-float": ("POST", "/v1/completions", {**GOOD, "logprobs": 1.5}, 400, "logprobs", "invalid_type"),
    "stream-not-bool": ("POST", "/v1/completions", {**GOOD, "stream": "yes"}, 400, "stream", "invalid_type"),
    "stream-options-without-stream": ("POST", "/v1/completions", {**GOOD, "stream_options": {"include_usage": True}},
                                      400, "stream_options", None),
    "skip-special-tokens-string": ("POST", "/v1/completions", {**GOOD, "skip_special_tokens": "no"}, 400,
                                   "skip_special_tokens", "invalid_type"),
    "return-token-ids-string": ("POST", "/v1/completions", {**GOOD, "return_token_ids": "yes"}, 400,
                                "return_token_ids", "invalid_type"),
    "unknown-field": ("POST", "/v1/completions", {**GOOD, "frobnicate": 1}, 400, "frobnicate",
                      "unrecognized_parameter"),
    "unsupported-best-of": ("POST", "/v1/completions", {**GOOD, "best_of": 3}, 400, "best_of",
                            "unsupported_parameter"),
    "penalty-out-of-range": ("POST", "/v1/completions", {**GOOD, "frequency_penalty": 2.5}, 400,
                             "frequency_penalty", "invalid_value"),
    "repetition-penalty-zero": ("POST", "/v1/completions", {**GOOD, "repetition_penalty": 0}, 400,
                                "repetition_penalty", "invalid_value"),
    "min-p-above-one": ("POST", "/v1/completions", {**GOOD, "min_p": 1.5}, 400, "min_p", "invalid_value"),
    "logit-bias-beyond-vocab": ("POST", "/v1/completions", {**GOOD, "logit_bias": {"999999": 1}}, 400,
                                "logit_bias", "invalid_token_id"),
    "logit-bias-not-an-id": ("POST", "/v1/completions", {**GOOD, "logit_bias": {"abc": 1}}, 400, "logit_bias",
                             "invalid_value"),
    "logit-bias-over-100": ("POST", "/v1/completions", {**GOOD, "logit_bias": {"5": 101}}, 400, "logit_bias.5",
                            "invalid_value"),
    "logit-bias-string-value": ("POST", "/v1/completions", {**GOOD, "logit_bias": {"5": "1"}}, 400,
                                "logit_bias.5", "invalid_type"),
    "prompt-logprobs-too-many": ("POST", "/v1/completions", {**GOOD, "prompt_logprobs": 21}, 400, "prompt_logprobs",
                                 "invalid_value"),
    "prompt-logprobs-negative": ("POST", "/v1/completions", {**GOOD, "prompt_logprobs": -1}, 400, "prompt_logprobs",
                                 "invalid_value"),
    "prompt-logprobs-string": ("POST", "/v1/completions", {**GOOD, "prompt_logprobs": "1"}, 400, "prompt_logprobs",
                               "invalid_type"),
    "prompt-logprobs-stream": ("POST", "/v1/completions", {**GOOD, "prompt_logprobs": 0, "stream": True}, 400,
                               "prompt_logprobs", None),
    "chat-prompt-logprobs-float": ("POST", "/v1/chat/completions", {**CHAT, "prompt_logprobs": 1.5}, 400,
                                   "prompt_logprobs", "invalid_type"),
    "chat-continue-and-generation-prompt": ("POST", "/v1/chat/completions",
                                            {**CHAT, "continue_final_message": True, "add_generation_prompt": True},
                                            400, "continue_final_message", None),
    "chat-return-token-ids-number": ("POST", "/v1/chat/completions", {**CHAT, "return_token_ids": 1}, 400,
                                     "return_token_ids", "invalid_type"),
    "chat-unknown-model": ("POST", "/v1/chat/completions", {**CHAT, "model": "x"}, 404, "model", "model_not_found"),
    "model-retrieve-unknown": ("GET", "/v1/models/gpt-17", None, 404, "model", "model_not_found"),
    "responses-store-string": ("POST", "/v1/responses", {"input": "hi", "store": "yes"}, 400, "store",
                               "invalid_type"),
    "responses-unknown-previous-id": ("POST", "/v1/responses", {"input": "hi", "previous_response_id": "resp_1"},
                                      404, "previous_response_id", "response_not_found"),
    "responses-tools": ("POST", "/v1/responses", {"input": "hi", "tools": [{"type": "web_search"}]}, 400, "tools",
                        "unsupported_parameter"),
    "responses-image-input": ("POST", "/v1/responses",
                              {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
                              400, "input", "invalid_type"),
    "responses-max-output-zero": ("POST", "/v1/responses", {"input": "hi", "max_output_tokens": 0}, 400,
                                  "max_output_tokens", "invalid_value"),
    "responses-unknown-field": ("POST", "/v1/responses", {"input": "hi", "frob": 1}, 400, "frob",
                                "unrecognized_parameter"),
    "tokenize-no-prompt": ("POST", "/tokenize", {"prompt": 5}, 400, "prompt", "invalid_type"),
    "detokenize-beyond-vocab": ("POST", "/detokenize", {"tokens": [5, 10**6]}, 400, "tokens", "invalid_token_id"),
    "detokenize-negative": ("POST", "/detokenize", {"tokens": [-1]}, 400, "tokens.0", "invalid_value"),
    "chat-empty-messages": ("POST", "/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages",
                            "invalid_value"),
    "chat-role-the-template-refuses": ("POST", "/v1/chat/completions",
                                       {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages",
                                       None),
    "chat-role-not-a-string": ("POST", "/v1/chat/completions", {**CHAT, "messages": [{"role": 5, "content": "x"}]},
                               400, "messages.0.role", "invalid_type"),
    "chat-tools-without-parser": ("POST", "/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {
        "name": "f"}}]}, 400, "tool_choice", None),
    "chat-beam-search": ("POST", "/v1/chat/completions", {**CHAT, "use_beam_search": True}, 400, "use_beam_search",
                         "unsupported_parameter"),
    "chat-image-part": ("POST", "/v1/chat/completions",
                        {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
                        400, "messages.0.content", "invalid_type"),
    "chat-user-without-content": ("POST", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user"}]}, 400,
                                  "messages.0.content", None),
    "chat-top-logprobs-alone": ("POST", "/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs",
                                None),
    "chat-over-context": ("POST", "/v1/chat/completions", {**CHAT, "max_completion_tokens": 9000}, 400, "messages",
                          "context_length_exceeded"),
    "chat-tiny-temperature-stop-ids": ("POST", "/v1/chat/completions",
                                       {**CHAT, "temperature": 1e-40, "stop_token_ids": [-1]}, 400,
                                       "stop_token_ids.0", "invalid_value"),
    "generate-text-and-ids": ("POST", "/generate", {"text": "a", "input_ids": [1]}, 400, "text", None),
    "generate-bad-sampling": ("POST", "/generate", {"text": "a", "sampling_params": {"temperature": -1}}, 400,
                              "sampling_params.temperature", "invalid_value"),
    "generate-infinite-temperature": ("POST", "/generate", b'{"text": "a", "sampling_params": {"temperature": 1e999}}',
                                      400, "sampling_params.temperature", "invalid_value"),
    "generate-seed-string": ("POST", "/generate", {"text": "a", "sampling_params": {"sampling_seed": "1"}}, 400,
                             "sampling_params.sampling_seed", "invalid_type"),
    "generate-seed-2**64": ("POST", "/generate", {"text": "a", "sampling_params": {"sampling_seed": 2**64}}, 400,
                            "sampling_params.sampling_seed", "invalid_value"),
    "generate-top-k-float": ("POST", "/generate", {"text": "a", "sampling_params": {"top_k": 2.5}}, 400,
                             "sampling_params.top_k", "invalid_type"),
    "generate-logprobs-float": ("POST", "/generate", {"text": "a", "return_logprob": True, "top_logprobs_num": 1.5},
                                400, "top_logprobs_num", "invalid_type"),
    "generate-logprob-start-without-logprobs": ("POST", "/generate", {"text": "a b", "logprob_start_len": 0}, 400,
                                                "logprob_start_len", None),
    "generate-logprob-start-past-prompt": ("POST", "/generate", {"text": "a", "return_logprob": True,
                                                                 "logprob_start_len": 1}, 400, "logprob_start_len",
                                           None),
    "generate-logprob-start-below-minus-one": ("POST", "/generate", {"text": "a", "return_logprob": True,
                                                                     "logprob_start_len": -2}, 400,
                                               "logprob_start_len", "invalid_value"),
    "generate-image": ("POST", "/generate", {"text": "a", "image_data": "x.png"}, 400, "image_data",
                       "unsupported_parameter"),
    "generate-json-schema": ("POST", "/generate", {"text": "a", "sampling_params": {"json_schema": '{"type": 1}'}},
                             400, "sampling_params.json_schema", "invalid_value"),
    "generate-batch-stream": ("POST", "/generate", {"text": ["a", "b"], "stream": True}, 400, "stream", None),
    "generate-unknown-model": ("POST", "/generate", {"text": "a", "model": "x"}, 404, "model", "model_not_found"),
    "generate-stop-token-ids-int": ("POST", "/generate", {"text": "a", "sampling_params": {"stop_token_ids": 5}},
                                    400, "sampling_params.stop_token_ids", "invalid_type"),
    "generate-stop-ids-beyond-vocab": ("POST", "/generate",
                                       {"text": "a", "sampling_params": {"stop_token_ids": [99999],
                                                                         "min_new_tokens": 1, "max_new_tokens": 2}},
                                       400, "sampling_params.stop_token_ids", "invalid_token_id"),
    "generate-stop-ints": ("POST", "/generate", {"text": "a", "sampling_params": {"stop": [5]}}, 400,
                           "sampling_params.stop", "invalid_type"),
    "generate-skip-special-string": ("POST", "/generate",
                                     {"text": "a", "sampling_params": {"skip_special_tokens": "no"}}, 400,
                                     "sampling_params.skip_special_tokens", "invalid_type"),
    "generate-max-tokens-float": ("POST", "/generate", {"text": "a", "sampling_params": {"max_new_tokens": 2.5}},
                                  400, "sampling_params.max_new_tokens", "invalid_type"),
    "generate-unknown-sampling-field": ("POST", "/generate", {"text": "a", "sampling_params": {"frob": 1}}, 400,
                                        "sampling_params.frob", "unrecognized_parameter"),
    "generate-surrogate-text": ("POST", "/generate", b'{"text": "\\ud800"}', 400, None, "invalid_unicode"),
    "unknown-route": ("POST", "/v1/engines", {}, 404, None, "not_found"),
    "wrong-method": ("GET", "/v1/completions", None, 405, None, "method_not_allowed"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_gets_error_envelope_and_server_stays_healthy(server, case):
    method, path, body, status, param, code = BAD_INPUTS[case]
    kw = {"content": body} if isinstance(body, bytes) else ({"json": body} if body is not None else {})
    r = httpx.request(method, f"{server.url}{path}", timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param and err["code"] == code, err
    if code == "context_length_exceeded":
        assert "maximum context length is 8192 tokens" in err["message"]
    good = httpx.post(f"{server.url}/v1/completions", json=GOOD, timeout=60)
    assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert _wait_idle(server)  # nothing left running, no cache pages or state slots held


def test_profiling_is_off_without_profile_dir(server):
    """/start_profile needs the server's --profile-dir (the parallel server's test profiles every rank)."""
    r = httpx.post(f"{server.url}/start_profile", timeout=60)
    assert r.status_code == 400 and "--profile-dir" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/stop_profile", timeout=60)
    assert r.status_code == 400 and "no profile is running" in r.json()["error"]["message"]
