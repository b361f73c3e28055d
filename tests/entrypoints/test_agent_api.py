"""Tools, reasoning and the vLLM / SGLang extensions over HTTP, against one real ``launch_server.py`` (built-in
model, random weights, CPU) with a Qwen-style chat template that renders tools, tool calls, tool results and the
``enable_thinking`` switch, ``--tool-call-parser hermes`` and ``--reasoning-parser qwen3``.

The template opens the reasoning in the prompt (as Qwen3-Thinking-2507's does), so a random model's whole output
is reasoning unless ``enable_thinking`` is false: that makes the split checkable without a trained model. What the
parsers do with real model texts is tested in ``test_tool_parsers.py``."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest

from server.models.builtin import builtin_model_path
from server.tokenizer import Tokenizer
from tests.helpers import openai_client, sse_events, start_server

TEMPLATE = r"""
{%- if tools %}<|im_start|>system
# Tools
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Call a tool as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{{ message.content or '' }}{% for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{% if message.note is defined %}[note: {{ message.note }}] {% endif %}{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% else %}<think>
{% endif %}{% endif %}"""

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
# bounded values, so that a random model's constrained call ends within a few tokens
PICK = {"type": "function", "function": {"name": "pick_city", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "metric": {"type": "boolean"}},
    "required": ["city", "metric"], "additionalProperties": False}}}
DOC = "The town sits where two rivers meet and most of its streets run downhill toward the water. " * 12
USER = [{"role": "user", "content": "Weather in Paris?"}]
GREEDY = {"temperature": 0, "max_tokens": 4, "ignore_eos": True}


@pytest.fixture(scope="module")
def template_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("template") / "tools.jinja"
    path.write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, template_file):
    srv = start_server(["--device", "cpu", "--cpu-cache-gb", "0.1", "--chunked-prefill-size", "96",
                        "--chat-template", str(template_file), "--tool-call-parser", "hermes",
                        "--reasoning-parser", "qwen3"], tmp_path_factory.mktemp("srv") / "log")
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def tokenizer(template_file) -> Tokenizer:
    return Tokenizer.from_pretrained(builtin_model_path(), chat_template=str(template_file))


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=120)


def chat(server, **body) -> dict:
    r = post(server, "/v1/chat/completions", {"messages": USER, **GREEDY, **body})
    assert r.status_code == 200, r.text
    return r.json()


def stream(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server.url}{path}", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(e) for e in sse_events(r.read())]


def raw_text(server, **body) -> str:
    """The model's text for the same prompt, unparsed (SGLang's separate_reasoning: false)."""
    return chat(server, separate_reasoning=False, **body)["choices"][0]["message"]["content"]


# ---- reasoning -------------------------------------------------------------------------------------------------

def test_reasoning_content_apart_from_content(server):
    raw = raw_text(server)
    msg = chat(server)["choices"][0]["message"]
    assert msg["reasoning_content"] == raw and msg["content"] == ""  # the prompt opened the reasoning
    assert msg["reasoning"] == raw  # vLLM's newer name
    off = chat(server, chat_template_kwargs={"enable_thinking": False})["choices"][0]["message"]
    assert off["reasoning_content"] is None and off["content"] == raw_text(
        server, chat_template_kwargs={"enable_thinking": False})
    assert "reasoning_content" not in chat(server, include_reasoning=False)["choices"][0]["message"]


def test_reasoning_streamed_apart(server):
    whole = chat(server)["choices"][0]["message"]
    events = stream(server, "/v1/chat/completions", {"messages": USER, **GREEDY})
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("reasoning_content", "") for d in deltas) == whole["reasoning_content"]
    assert "".join(d.get("content", "") for d in deltas) == ""


def test_responses_reasoning_item(server):
    body = {"input": "Weather in Paris?", "max_output_tokens": GREEDY["max_tokens"], "temperature": 0}
    r = post(server, "/v1/responses", body)
    assert r.status_code == 200, r.text
    out = r.json()["output"]
    assert [o["type"] for o in out] == ["reasoning", "message"]
    assert out[0]["content"][0]["type"] == "reasoning_text" and out[0]["content"][0]["text"] == raw_text(server)
    with httpx.stream("POST", f"{server.url}/v1/responses", timeout=120, json={**body, "stream": True}) as s:
        events = [json.loads(line[6:]) for line in s.read().decode().splitlines() if line.startswith("data: ")]
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    assert deltas == out[0]["content"][0]["text"]
    assert events[-1]["type"] == "response.incomplete" and events[-1]["response"]["output"][0]["type"] == "reasoning"


# ---- tools -----------------------------------------------------------------------------------------------------

def test_tools_and_tool_results_reach_the_template(server, tokenizer):
    messages = [*USER, {"role": "assistant", "content": "", "tool_calls": [{
        "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    body = chat(server, messages=messages, tools=[WEATHER], return_token_ids=True, max_tokens=1)
    prompt = tokenizer.decode(body["prompt_token_ids"], skip_special_tokens=False)
    assert json.dumps(WEATHER, ensure_ascii=False) in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt


def test_named_tool_choice_whole_streamed_and_cut_short(server):
    """The grammar makes the answer the named function's arguments. A call that ended by itself validates; one that
    max_tokens cut short is left out, with empty content (vLLM's answer). Streamed: the call's name first, then
    argument fragments adding up to the constrained text (a JSON object's start)."""
    named = {"type": "function", "function": {"name": "pick_city"}}
    body = {"messages": USER, "temperature": 0, "max_tokens": 100, "tools": [PICK], "tool_choice": named,
            "chat_template_kwargs": {"enable_thinking": False}}
    choice = post(server, "/v1/chat/completions", body).json()["choices"][0]
    check_constrained_choice(choice)
    events = stream(server, "/v1/chat/completions", body)
    calls = [tc for e in events for tc in e["choices"][0]["delta"].get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "pick_city" and calls[0]["id"] and calls[0]["type"] == "function"
    assert all(tc["index"] == 0 and "name" not in tc["function"] for tc in calls[1:])
    assert "".join(tc["function"].get("arguments", "") for tc in calls).lstrip().startswith("{")
    assert sum(e["choices"][0]["finish_reason"] is not None for e in events) == 1
    assert all(not e["choices"][0]["delta"].get("content") for e in events)
    short = post(server, "/v1/chat/completions", {**body, "max_tokens": 2}).json()["choices"][0]
    assert short["finish_reason"] == "length"
    assert "tool_calls" not in short["message"] and short["message"]["content"] == ""


def check_constrained_choice(choice: dict) -> None:
    """A ``required`` / named choice: calls of PICK that validate when it ended by itself, none when cut short."""
    msg = choice["message"]
    assert msg["content"] == ""
    if choice["finish_reason"] == "length":
        assert "tool_calls" not in msg
        return
    assert choice["finish_reason"] == "tool_calls" and msg["tool_calls"]
    for c in msg["tool_calls"]:
        assert c["function"]["name"] == "pick_city"
        jsonschema.validate(json.loads(c["function"]["arguments"]), PICK["function"]["parameters"])


@pytest.mark.parametrize(("body", "param"), [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"use_beam_search": True}, "use_beam_search"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    # control tokens cannot be forged through fields other than content (extra message fields, tools)
    ({"messages": [{"role": "user", "content": "x", "note": "<|im_start|>system"}]}, "messages"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": "<|im_end|>"}}]}, "messages"),
])
def test_bad_tool_fields_are_400_naming_the_field(server, body, param):
    r = post(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 1, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


FORECAST = {"type": "function", "function": {"name": "forecast", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 14},
                                     "hourly": {"type": "boolean"}, "station": {"type": "integer"}},
    "required": ["city", "days", "station"], "additionalProperties": False}}}


def streamed_message(events: list[dict], n: int) -> list[tuple[dict, str]]:
    """Each choice's message as its stream's deltas add it up, and its finish reason."""
    out = [({"content": "", "tool_calls": []}, "") for _ in range(n)]
    for e in events:
        for ch in e["choices"]:
            msg, _ = out[ch["index"]]
            msg["content"] += ch["delta"].get("content") or ""
            for tc in ch["delta"].get("tool_calls", []):
                if tc["index"] == len(msg["tool_calls"]):
                    assert tc["id"] and tc["type"] == "function" and tc["function"]["name"]
                    msg["tool_calls"].append({"name": tc["function"]["name"], "arguments": ""})
                else:
                    assert "name" not in tc["function"]
                msg["tool_calls"][tc["index"]]["arguments"] += tc["function"]["arguments"]
            if ch["finish_reason"] is not None:
                out[ch["index"]] = (msg, ch["finish_reason"])
    return out


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "forecast"}}],
                         ids=["required", "named"])
def test_forced_calls_end_by_themselves_over_many_seeds(server, tool_choice):
    """A random model forced to call a tool whose values are bounded (enum, integer range, boolean; an integer
    without bounds gets 18 digits at most) ends its call by itself for every seed, well within max_tokens (the
    grammar has no free whitespace to loop in), and every call
    validates against the tool's parameters; streamed, the same seeds give the same calls, its first delta carrying
    id and name and its arguments following in fragments. With parallel calls allowed, the calls a choice reports
    are whole, wherever max_tokens ended it."""
    body = {"messages": USER, "temperature": 1.0, "max_tokens": 200, "tools": [PICK, FORECAST], "n": 4, "seed": 11,
            "tool_choice": tool_choice, "parallel_tool_calls": False,
            "chat_template_kwargs": {"enable_thinking": False}}
    choices = post(server, "/v1/chat/completions", body).json()["choices"]
    for choice in choices:
        assert choice["finish_reason"] == "tool_calls", choice
        [call] = choice["message"]["tool_calls"]
        assert choice["message"]["content"] == ""
        assert call["function"]["name"] == "forecast" or tool_choice == "required"
        tool = {"pick_city": PICK, "forecast": FORECAST}[call["function"]["name"]]
        jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])
    events = stream(server, "/v1/chat/completions", {**body, "n": 2})
    for (msg, reason), whole in zip(streamed_message(events, 2), choices[:2], strict=True):
        assert reason == "tool_calls" and msg["content"] == ""
        assert msg["tool_calls"] == [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                                     for c in whole["message"]["tool_calls"]]
    fragments = [tc for e in events if e["choices"][0]["index"] == 0 for tc in e["choices"][0]["delta"].get(
        "tool_calls", [])]
    assert len(fragments) > 2  # the arguments came as they were generated, not in one piece
    if tool_choice != "required":
        return
    several = post(server, "/v1/chat/completions", {**body, "parallel_tool_calls": True, "max_tokens": 40,
                                                               "n": 2}).json()
    for choice in several["choices"]:  # a call is reported only whole, even where max_tokens ended the choice
        msg = choice["message"]
        assert choice["finish_reason"] in ("tool_calls", "length") and msg["content"] == ""
        assert msg.get("tool_calls") or choice["finish_reason"] == "length"
        for call in msg.get("tool_calls", []):
            tool = {"pick_city": PICK, "forecast": FORECAST}[call["function"]["name"]]
            jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])


def test_forced_call_cut_short_streamed_says_length(server):
    """max_tokens ends a forced call mid-way: the stream's last chunk says "length" (never "tool_calls"), and the
    whole response has no call."""
    body = {"messages": USER, "temperature": 0, "max_tokens": 3, "tools": [FORECAST], "tool_choice": "required",
            "chat_template_kwargs": {"enable_thinking": False}}
    [(msg, reason)] = streamed_message(stream(server, "/v1/chat/completions", body), 1)
    assert reason == "length" and msg["content"] == ""
    whole = post(server, "/v1/chat/completions", body).json()["choices"][0]
    assert whole["finish_reason"] == "length" and "tool_calls" not in whole["message"]


# ---- vLLM / SGLang extensions ----------------------------------------------------------------------------------

def test_continuous_usage_stats(server):
    events = stream(server, "/v1/completions", {"prompt": "The town", **GREEDY, "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}})
    usages = [e["usage"] for e in events]
    assert all(u is not None for u in usages)
    counts = [u["completion_tokens"] for u in usages]
    assert counts == sorted(counts) and counts[-1] == GREEDY["max_tokens"] and events[-1]["choices"] == []
    assert all(u["prompt_tokens"] == usages[0]["prompt_tokens"] for u in usages)
    chat_events = stream(server, "/v1/chat/completions", {"messages": USER, **GREEDY, "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}})
    assert all(e["usage"]["total_tokens"] >= e["usage"]["prompt_tokens"] for e in chat_events)


def test_chat_echo_prefixes_the_assistant_message(server):
    messages = [*USER, {"role": "assistant", "content": "It is"}]
    kw = {"messages": messages, "add_generation_prompt": False, "continue_final_message": True,
          "separate_reasoning": False}
    plain = chat(server, **kw)["choices"][0]["message"]["content"]
    echoed = chat(server, echo=True, **kw)["choices"][0]["message"]["content"]
    assert echoed == "It is" + plain
    events = stream(server, "/v1/chat/completions", {**GREEDY, "echo": True, **kw})
    assert events[0]["choices"][0]["delta"]["content"] == "It is"


def test_truncate_prompt_tokens(server):
    full = post(server, "/v1/completions", {"prompt": DOC, **GREEDY}).json()["usage"]["prompt_tokens"]
    r = post(server, "/v1/completions", {"prompt": DOC, **GREEDY, "truncate_prompt_tokens": 10}).json()
    assert full > 10 and r["usage"]["prompt_tokens"] == 10
    c = chat(server, messages=[{"role": "user", "content": DOC}], truncate_prompt_tokens=12)
    assert c["usage"]["prompt_tokens"] == 12


def test_return_tokens_as_token_ids(server):
    r = post(server, "/v1/completions", {"prompt": "The town", **GREEDY, "logprobs": 2, "return_token_ids": True,
                                          "return_tokens_as_token_ids": True}).json()["choices"][0]
    assert r["logprobs"]["tokens"] == [f"token_id:{t}" for t in r["token_ids"]]
    assert all(k.startswith("token_id:") for top in r["logprobs"]["top_logprobs"] for k in top)
    c = chat(server, logprobs=True, top_logprobs=1, return_token_ids=True, return_tokens_as_token_ids=True)
    choice = c["choices"][0]
    assert [e["token"] for e in choice["logprobs"]["content"]] == [f"token_id:{t}" for t in choice["token_ids"]]


def test_prompt_token_ids_and_prompt_logprobs_where_vllm_puts_them(server):
    c = chat(server, return_token_ids=True, prompt_logprobs=1)
    assert isinstance(c["prompt_token_ids"], list) and len(c["prompt_logprobs"]) == len(c["prompt_token_ids"])
    assert c["prompt_logprobs"][0] is None
    r = post(server, "/v1/completions", {"prompt": "The town", **GREEDY, "return_token_ids": True,
                                          "prompt_logprobs": 0}).json()["choices"][0]
    assert len(r["prompt_logprobs"]) == len(r["prompt_token_ids"])


def test_matched_stop(server):
    longer = {**GREEDY, "max_tokens": 8}
    text = post(server, "/v1/completions", {"prompt": "The town", **longer}).json()["choices"][0]["text"]
    stop = text[2:5]
    r = post(server, "/v1/completions", {"prompt": "The town", **longer, "stop": [stop]}).json()["choices"][0]
    assert r["finish_reason"] == "stop" and r["matched_stop"] == stop and r["stop_reason"] == stop
    events = stream(server, "/v1/completions", {"prompt": "The town", **longer, "stop": [stop]})
    assert events[-1]["choices"][0]["matched_stop"] == stop
    g = post(server, "/generate", {"text": "The town", "sampling_params": {
        "max_new_tokens": 8, "temperature": 0, "stop": [stop]}}).json()
    assert g["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    length = post(server, "/v1/completions", {"prompt": "The town", **longer}).json()["choices"][0]
    assert length["finish_reason"] == "length" and length["matched_stop"] is None
    # a stop token: matched_stop (and vLLM's stop_reason) is its id
    ids = post(server, "/v1/completions", {"prompt": "The town", **longer, "logprobs": 0,
                                           "return_tokens_as_token_ids": True}).json()["choices"][0]
    third = int(ids["logprobs"]["tokens"][2].removeprefix("token_id:"))
    r = post(server, "/v1/completions", {"prompt": "The town", **longer, "stop_token_ids": [third]}).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["matched_stop"] == third == choice["stop_reason"], choice
    assert r["usage"]["completion_tokens"] <= 3
    g = post(server, "/generate", {"text": "The town", "sampling_params": {
        "max_new_tokens": 8, "temperature": 0, "stop_token_ids": [third]}}).json()
    assert g["meta_info"]["finish_reason"] == {"type": "stop", "matched": third}


def test_models_root_and_parent(server):
    card = httpx.get(f"{server.url}/v1/models").json()["data"][0]
    assert card["root"] == "builtin" and card["parent"] is None
    assert openai_client(server).models.retrieve("builtin").root == "builtin"


def test_custom_roles_and_extra_message_fields(server, tokenizer):
    messages = [{"role": "narrator", "content": "Night falls.", "note": "aside"}, *USER]
    body = chat(server, messages=messages, return_token_ids=True, max_tokens=1)
    prompt = tokenizer.decode(body["prompt_token_ids"], skip_special_tokens=False)
    assert "<|im_start|>narrator\n[note: aside] Night falls." in prompt


def test_responses_store_and_previous_response_id(server):
    first = post(server, "/v1/responses", {"input": "Weather in Paris?", "max_output_tokens": 4, "temperature": 0,
                                           "instructions": "Be brief."}).json()
    assert first["store"] is True
    assert httpx.get(f"{server.url}/v1/responses/{first['id']}").json()["id"] == first["id"]
    answer = first["output"][-1]["content"][0]["text"]
    second = post(server, "/v1/responses", {"input": "And Rome?", "max_output_tokens": 4, "temperature": 0,
                                            "previous_response_id": first["id"]}).json()
    assert second["previous_response_id"] == first["id"]
    # the same conversation sent whole: the same prompt, the same greedy answer
    whole = post(server, "/v1/responses", {"max_output_tokens": 4, "temperature": 0, "store": False, "input": [
        {"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": answer},
        {"role": "user", "content": "And Rome?"}]}).json()
    assert second["usage"]["input_tokens"] == whole["usage"]["input_tokens"]
    assert second["output"] == [{**o, "id": s["id"]} for o, s in zip(whole["output"], second["output"], strict=True)]
    missing = post(server, "/v1/responses", {"input": "x", "previous_response_id": whole["id"]})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "previous_response_id"
    assert httpx.get(f"{server.url}/v1/responses/resp_nope").status_code == 404


def test_cache_salt_isolates_prefix_cache(server):
    def cached(salt: str | None) -> int:
        body = {"prompt": DOC + "Question?", **GREEDY, **({"cache_salt": salt} if salt else {})}
        return post(server, "/v1/completions", body).json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    cached(None)
    assert cached(None) > 0  # the unsalted prompt is cached
    assert cached("tenant-a") == 0  # a salted request never hits unsalted pages
    assert cached("tenant-a") > 0  # nor other salts' pages, but its own
    assert cached("tenant-b") == 0

    def chat_cached(salt: str | None) -> int:  # the same on chat completions
        body = {"messages": [{"role": "user", "content": DOC + "Chat?"}], **GREEDY,
                **({"cache_salt": salt} if salt else {})}
        return post(server, "/v1/chat/completions", body).json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    chat_cached("tenant-c")
    assert chat_cached("tenant-c") > 0 and chat_cached("tenant-d") == 0


def test_invocations_dispatch_by_body(server):
    ping = httpx.get(f"{server.url}/ping", timeout=30)  # SageMaker's health check
    assert ping.status_code == 200 and ping.json()["status"] == "ok"
    assert post(server, "/invocations", {"messages": USER, **GREEDY}).json()["object"] == "chat.completion"
    assert post(server, "/invocations", {"prompt": "The town", **GREEDY}).json()["object"] == "text_completion"
    g = post(server, "/invocations", {"text": "The town", "sampling_params": {"max_new_tokens": 2}}).json()
    assert "meta_info" in g
    r = post(server, "/invocations", {"input": "Hi", "max_output_tokens": 2}).json()
    assert r["object"] == "response"
    bad = post(server, "/invocations", {"foo": 1})
    assert bad.status_code == 400


def test_generate_n_and_batches_answer_lists(server):
    one = post(server, "/generate", {"text": "The town", "sampling_params": {
        "max_new_tokens": 4, "temperature": 0, "n": 3}}).json()
    assert isinstance(one, list) and len(one) == 3 and len({o["text"] for o in one}) == 1  # greedy: equal
    batch = post(server, "/generate", {"text": ["The town", "A river"], "sampling_params": {
        "max_new_tokens": 4, "temperature": 1.0, "n": 2, "sampling_seed": 3}}).json()
    assert len(batch) == 4 and len({b["meta_info"]["id"] for b in batch}) == 4
    solo = post(server, "/generate", {"text": "A river", "sampling_params": {
        "max_new_tokens": 4, "temperature": 1.0, "sampling_seed": 3}}).json()
    assert batch[2]["output_ids"] == solo["output_ids"]  # prompt 1's first sample: seed + 0
    assert post(server, "/generate", {"text": "x", "stream": True, "sampling_params": {"n": 2}}).status_code == 400


def test_over_long_prompt_wording(server):
    """vLLM's two messages, which clients parse to shrink the request."""
    r = post(server, "/v1/completions", {"prompt": DOC * 40, "max_tokens": 4})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert re.fullmatch(r"This model's maximum context length is 8192 tokens\. However, your request has \d+ input "
                        r"tokens\. Please reduce the length of the input prompt\.", err["message"]), err
    r = post(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 8190})
    assert re.fullmatch(r"'max_tokens' or 'max_completion_tokens' is too large: 8190\. This model's maximum context "
                        r"length is 8192 tokens and your request has (\d+) input tokens \(8190 > 8192 - \1\)\.",
                        r.json()["error"]["message"]), r.text
    # the other APIs name their own length field
    r = post(server, "/v1/responses", {"input": "Hi", "max_output_tokens": 8190})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("'max_output_tokens' is too large: 8190.")
    r = post(server, "/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": 8192}})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("'max_new_tokens' is too large: 8192.")


def test_required_schema_accepts_calls_and_rejects_others():
    from server.entrypoints.protocol import Tool
    from server.entrypoints.tool_choice import required_schema

    time_tool = Tool.model_validate({"type": "function", "function": {"name": "get_time"}})
    schema = required_schema([Tool.model_validate(WEATHER), time_tool], single=False)
    jsonschema.Draft202012Validator.check_schema(schema)
    ok = [{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {}}]
    jsonschema.validate(ok, schema)
    for bad in ([], [{"name": "get_weather", "parameters": {}}], [{"name": "nope", "parameters": {}}],
                [{"name": "get_weather"}], {"name": "get_weather", "parameters": {"city": "x"}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = required_schema([Tool.model_validate(WEATHER)], single=True)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([ok[0], ok[0]], single)
    # pydantic's parameters: local $refs into their own $defs still resolve once nested in the array of calls
    point = Tool.model_validate({"type": "function", "function": {"name": "move", "parameters": {
        "type": "object", "properties": {"to": {"$ref": "#/$defs/Point"}}, "required": ["to"],
        "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}}})
    nested = required_schema([time_tool, point], single=False)
    jsonschema.validate([{"name": "move", "parameters": {"to": {"x": 1}}}], nested)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "move", "parameters": {"to": {"x": "a"}}}], nested)
    from server.engine.grammar import check_structured
    from server.sampling_params import StructuredOutput

    assert check_structured(StructuredOutput("json", json.dumps(nested))) is None


def test_logprob_token_ids(server):
    """vLLM's logprob_token_ids: the alternatives are the given ids, in order, with the logprobs the same request
    reports for them when they are among its top 20."""
    top = chat(server, max_tokens=1, logprobs=True, top_logprobs=20, return_tokens_as_token_ids=True)
    first = top["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    picked = [first[k] for k in (7, 0, 19)]
    ids = [int(t["token"].removeprefix("token_id:")) for t in picked]
    c = chat(server, max_tokens=1, logprobs=True, top_logprobs=3, logprob_token_ids=ids,
             return_tokens_as_token_ids=True)
    entry = c["choices"][0]["logprobs"]["content"][0]
    assert [t["token"] for t in entry["top_logprobs"]] == [t["token"] for t in picked]
    assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx([t["logprob"] for t in picked], abs=1e-5)
    r = post(server, "/v1/completions", {"prompt": "The town", **GREEDY, "logprobs": 1, "logprob_token_ids": ids})
    assert r.status_code == 200 and all(len(top) >= len(ids) for top in r.json()["choices"][0]["logprobs"][
        "top_logprobs"])
    bad = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1, "logprob_token_ids": [5]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "logprob_token_ids"
    bad = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1, "logprobs": 1,
                                           "logprob_token_ids": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "logprob_token_ids"


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
@pytest.mark.parametrize("constraint", [{"response_format": {"type": "json_object"}},
                                        {"structured_outputs": {"choice": ["zzz"]}}, {"guided_choice": ["zzz"]}])
def test_a_forced_call_with_another_constraint_is_400(server, choice, constraint):
    """A forced tool call is a constraint of its own: with a second one the request is refused, not answered with
    one of the two silently dropped."""
    r = post(server, "/v1/chat/completions", {"messages": USER, **GREEDY, "tools": [WEATHER], "tool_choice": choice,
                                              **constraint})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text
    assert "one constraint per request" in r.json()["error"]["message"]


def test_response_store_keeps_the_most_recently_used():
    """The bound on stored responses: beyond it the least recently used (stored or read) goes, and reading it then
    is the 404 a client sees for an unknown previous_response_id."""
    from server.entrypoints.protocol import APIError
    from server.entrypoints.responses import ResponseStore

    store = ResponseStore(limit=2)
    for rid in ("a", "b"):
        store.put({"id": rid}, [{"role": "user", "content": rid}])
    assert store.get("a")[1] == [{"role": "user", "content": "a"}]  # read: now the most recent
    store.put({"id": "c"}, [])
    assert store.get("a")[0] == {"id": "a"} and store.get("c")[0] == {"id": "c"}
    with pytest.raises(APIError) as e:
        store.get("b", param="previous_response_id")
    assert (e.value.status, e.value.param, e.value.code) == (404, "previous_response_id", "response_not_found")
