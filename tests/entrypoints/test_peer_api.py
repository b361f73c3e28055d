"""The API as vLLM / SGLang / OpenAI clients use it, against a real ``launch_server.py`` (built-in model, CPU,
``--chat-template`` from a file): stream shapes, model retrieval, logprobs details, ``/tokenize`` and
``/detokenize``, ``/v1/responses``, SGLang's ``/generate`` as its documentation calls it, chat generation-prompt
controls, the per-request log line and the new metrics."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from server.models.builtin import CHAT_TEMPLATE, builtin_model_path
from server.tokenizer import Tokenizer
from tests.helpers import openai_client, prometheus_value, sse_events, start_server

CUSTOM = "[custom]"
MESSAGES = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Where is the ferry?"},
            {"role": "assistant", "content": "It leaves from"}, {"role": "tool", "content": "ferry: pier 3"},
            {"role": "user", "content": "And the library?"}]
GREEDY = {"temperature": 0, "ignore_eos": True}
GREEDY_SDK = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def template_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("template") / "chat.jinja"
    path.write_text("{{- '" + CUSTOM + "' }}" + CHAT_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, template_file):
    srv = start_server(["--device", "cpu", "--cpu-cache-gb", "0.1", "--chat-template", str(template_file)],
                       tmp_path_factory.mktemp("srv") / "log")
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai_client(server)


@pytest.fixture(scope="module")
def tokenizer(template_file) -> Tokenizer:
    return Tokenizer.from_pretrained(builtin_model_path(), chat_template=str(template_file))


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=120)


def stream_events(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server.url}{path}", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        return [json.loads(e) for e in sse_events(r.read())]


def test_models_retrieve_and_unknown_model(client):
    assert client.models.retrieve("builtin").id == "builtin"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-17")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-17", prompt="hi", max_tokens=1)


def test_streams_end_on_the_last_token_chunk(server):
    """vLLM's shape: the last token's chunk carries its text, its logprobs and the finish_reason."""
    body = {"model": "builtin", "prompt": "The town sits where", "max_tokens": 6, "logprobs": 1, **GREEDY}
    whole = post(server, "/v1/completions", body).json()["choices"][0]
    events = stream_events(server, "/v1/completions", body)
    choices = [e["choices"][0] for e in events]
    assert [c["finish_reason"] for c in choices] == [None] * (len(choices) - 1) + ["length"]
    assert choices[-1]["text"] and len(choices[-1]["logprobs"]["tokens"]) == 1
    assert "".join(c["text"] for c in choices) == whole["text"]
    assert sum(len(c["logprobs"]["tokens"]) for c in choices) == 6
    chat = {"model": "builtin", "messages": MESSAGES[:2], "max_tokens": 5, "logprobs": True, **GREEDY}
    events = stream_events(server, "/v1/chat/completions", chat)
    choices = [e["choices"][0] for e in events]
    assert choices[0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["finish_reason"] for c in choices] == [None] * (len(choices) - 1) + ["length"]
    assert choices[-1]["delta"]["content"] and len(choices[-1]["logprobs"]["content"]) == 1
    whole = post(server, "/v1/chat/completions", chat).json()["choices"][0]["message"]["content"]
    assert "".join(c["delta"].get("content", "") for c in choices) == whole


def test_logprobs_zero_and_token_bytes(client, tokenizer):
    out = client.completions.create(model="builtin", prompt="Bread is", max_tokens=3, logprobs=0, temperature=0)
    lp = out.choices[0].logprobs
    # logprobs=0: the sampled token's logprob alone (OpenAI: always the sampled token, plus the top N)
    assert [list(top.items()) for top in lp.top_logprobs] == [[(t, v)] for t, v in zip(lp.tokens, lp.token_logprobs)]
    # A byte-level token holding one byte of a UTF-8 character: its text is U+FFFD, its bytes are its own.
    partial = tokenizer.token_to_id("ä")  # the byte-level alphabet's character for byte 0xE4
    chat = client.chat.completions.create(model="builtin", messages=MESSAGES[:2], max_tokens=2, temperature=0,
                                          logprobs=True, top_logprobs=3, logit_bias={str(partial): 100})
    content = chat.choices[0].logprobs.content
    assert content[0].token == "\ufffd" and content[0].bytes == [0xE4]
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace") == chat.choices[0].message.content
    assert all(bytes(e.bytes).decode("utf-8", "replace") == e.token for e in content[0].top_logprobs)


def test_tokenize_and_detokenize(server, tokenizer):
    r = post(server, "/tokenize", {"model": "builtin", "prompt": "héllo wörld", "return_token_strs": True}).json()
    ids = tokenizer.encode("héllo wörld")
    assert r == {"count": len(ids), "max_model_len": 8192, "tokens": ids,
                 "token_strs": [tokenizer.id_to_token(t) for t in ids]}
    assert post(server, "/detokenize", {"tokens": ids}).json() == {"prompt": "héllo wörld"}
    # Chat messages: the --chat-template file, every role the docs list, and vLLM's generation-prompt controls.
    chat = post(server, "/tokenize", {"messages": MESSAGES}).json()
    text = tokenizer.apply_chat_template(MESSAGES)
    assert text.startswith(CUSTOM + "<|im_start|>developer\n") and "<|im_start|>tool\n" in text
    assert chat["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    no_prompt = post(server, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False}).json()
    assert no_prompt["tokens"] == tokenizer.encode(tokenizer.apply_chat_template(MESSAGES, False),
                                                   add_special_tokens=False)
    cont = post(server, "/tokenize", {"messages": MESSAGES[:3], "continue_final_message": True}).json()
    assert post(server, "/detokenize", {"tokens": cont["tokens"]}).json()["prompt"].endswith(
        "<|im_start|>assistant\nIt leaves from")
    with open(f"{builtin_model_path()}/tokenizer_config.json") as f:
        assert json.load(f)["chat_template"] == CHAT_TEMPLATE  # the built-in model ships the template above


def test_chat_continue_final_message(client, server):
    """The continued answer is what a completion of the rendered, open-ended prompt gives."""
    prompt = post(server, "/tokenize", {"messages": MESSAGES[:3], "continue_final_message": True}).json()["tokens"]
    want = client.completions.create(model="builtin", prompt=prompt, max_tokens=6, **GREEDY_SDK).choices[0].text
    out = client.chat.completions.create(model="builtin", messages=MESSAGES[:3], max_tokens=6,
                                         extra_body={"continue_final_message": True, "add_generation_prompt": False,
                                                     "ignore_eos": True}, temperature=0)
    assert out.choices[0].message.content == want
    assert out.usage.prompt_tokens == len(prompt)


def test_responses_api(client):
    kw = dict(model="builtin", instructions="Be brief.", input="Where is the ferry?", max_output_tokens=6,
              temperature=0)
    resp = client.responses.create(**kw)
    chat = client.chat.completions.create(model="builtin", max_tokens=6, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is the ferry?"}])
    assert resp.object == "response" and resp.output_text == chat.choices[0].message.content
    assert resp.usage.input_tokens == chat.usage.prompt_tokens and resp.usage.output_tokens == 6
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    events = list(client.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == resp.output_text
    assert events[-1].response.output_text == resp.output_text
    # A message list, with an earlier answer sent back as output_text.
    again = client.responses.create(model="builtin", max_output_tokens=3, temperature=0, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": resp.output_text}]},
        {"role": "user", "content": "More?"}])
    assert again.usage.output_tokens == 3


def test_generate_as_sglang_documents_it(server, client):
    """The requests of SGLang's sampling-params and native-API docs, and the fields its clients read."""
    body = {"text": "The capital of France is", "sampling_params": {"temperature": 0, "max_new_tokens": 8}}
    out = post(server, "/generate", body).json()
    want = client.completions.create(model="builtin", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert out["text"] == want.choices[0].text
    meta = out["meta_info"]
    assert meta["prompt_tokens"] == want.usage.prompt_tokens and meta["completion_tokens"] == len(out["output_ids"])
    assert meta["finish_reason"]["type"] in ("stop", "length") and meta["cached_tokens"] == 0
    assert meta["e2e_latency"] > 0 and meta["id"]
    # The docs' streaming client: text is cumulative, each chunk extends the last, [DONE] ends it.
    events = stream_events(server, "/generate", body)
    texts = [e["text"] for e in events]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])) and texts[-1] == out["text"]
    assert events[-1]["output_ids"] == out["output_ids"] and events[-1]["meta_info"]["finish_reason"]
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])
    # Logprobs of the output tokens: [logprob, token_id, text].
    lp = post(server, "/generate", {**body, "return_logprob": True, "top_logprobs_num": 2,
                                    "return_text_in_logprobs": True}).json()["meta_info"]
    assert [t for _, t, _ in lp["output_token_logprobs"]] == out["output_ids"]
    assert all(len(top) == 2 and top[0][0] == lp["output_token_logprobs"][i][0]
               for i, top in enumerate(lp["output_top_logprobs"]))
    assert lp["input_token_logprobs"] == []
    # Batches, stop strings and stop token ids, with what matched.
    batch = post(server, "/generate", {"text": ["a", "b"], "sampling_params": {"max_new_tokens": 2, **GREEDY},
                                       "rid": ["r1", "r2"]}).json()
    assert [b["meta_info"]["id"] for b in batch] == ["r1", "r2"]
    assert all(b["meta_info"]["finish_reason"] == {"type": "length", "length": 2} for b in batch)
    stop_id = out["output_ids"][2]
    by_id = post(server, "/generate", {**body, "sampling_params": {**body["sampling_params"],
                                                                   "stop_token_ids": [stop_id]}}).json()
    assert by_id["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    word = out["text"][len(out["text"]) // 2:].split()[0] if out["text"].split() else out["text"][-2:]
    by_str = post(server, "/generate", {**body, "sampling_params": {**body["sampling_params"], "stop": [word]}})
    assert by_str.json()["meta_info"]["finish_reason"] == {"type": "stop", "matched": word}


def test_request_log_lines_and_metrics(server):
    post(server, "/v1/completions", {"prompt": "log me", "max_tokens": 2, **GREEDY})
    log = server.log()
    assert "loading the model from " in log and "builtin-v2" in log and "model loaded" in log
    assert "loading weights: model.safetensors (1/1, " in log
    assert re.search(r"request \w+ finished: length; prompt \d+ tokens, completion 2 tokens; ttft [\d.]+s, "
                     r"latency [\d.]+s", log)
    r = httpx.get(f"{server.url}/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = r.text
    assert prometheus_value(m, "server_engine_steps_total") > 0
    assert prometheus_value(m, "server_step_requests_count") == prometheus_value(m, "server_engine_steps_total")
    assert prometheus_value(m, "server_step_decode_tokens_sum") > 0
    assert prometheus_value(m, "server_step_prefill_tokens_sum") > 0
    assert prometheus_value(m, 'server_sp_placements_total{placement="split"}') == 0  # one SP rank: never split
