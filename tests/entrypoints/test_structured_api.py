"""Structured outputs over HTTP, against a real server at sp = 2 (a tiny random Llama with a real tokenizer): every
way a client asks for one (OpenAI's ``response_format`` and the Responses API's ``text.format``, vLLM's
``structured_outputs`` and ``guided_*``, SGLang's ``json_schema`` / ``regex`` / ``ebnf``), streamed and not, with
``n = 3``; every schema of the battery (tests/structured_cases.py) is asked for as ``response_format`` streamed and
not; each output is checked with ``jsonschema`` / Python's ``re``. Requests run concurrently, so they share
engine steps. Invalid schemas, regexes and grammars are a 400 naming the field, and the server stays healthy.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest

from server.tokenizer import Tokenizer
from tests.helpers import start_server
from tests.structured_cases import SCHEMAS, closing_bias, structured_checkpoint

MAX_TOKENS = 300
N = 3
MESSAGES = [{"role": "user", "content": "Reply in the format asked."}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return structured_checkpoint(str(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint):
    srv = start_server(["--model-path", checkpoint, "--device", "cpu", "--cpu-cache-gb", "0.1", "--sp-size", "2"],
                       tmp_path_factory.mktemp("srv") / "log")
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def bias(checkpoint) -> dict[str, float]:
    return {str(k): v for k, v in closing_bias(Tokenizer.from_pretrained(checkpoint)).items()}


def _post(url: str, body: dict) -> httpx.Response:
    return httpx.post(url, json=body, timeout=600)


def _stream(url: str, body: dict) -> list[dict]:
    """The JSON payloads of a server-sent-event stream, ``[DONE]`` left out."""
    with httpx.stream("POST", url, json=body, timeout=600) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]


def _stream_texts(chunks: list[dict], key) -> tuple[list[str], list[str | None]]:
    """Each choice's text and finish reason, from a stream's chunks."""
    texts, reasons = [""] * N, [None] * N
    for c in chunks:
        for ch in c["choices"]:
            texts[ch["index"]] += key(ch) or ""
            reasons[ch["index"]] = ch["finish_reason"] or reasons[ch["index"]]
    return texts, reasons


def test_every_request_form_gives_valid_outputs(server, bias):
    chat, completions = f"{server.url}/v1/chat/completions", f"{server.url}/v1/completions"
    common = {"max_tokens": MAX_TOKENS, "temperature": 1.0, "logit_bias": bias, "n": N}
    jobs = []  # (name, how to run it, how to read its texts and finish reasons, check)
    for i, schema in enumerate(SCHEMAS):  # the whole battery, each schema streamed and not
        body = {**common, "messages": MESSAGES, "seed": i, "response_format": {
            "type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}}
        check = lambda t, s=schema: jsonschema.validate(json.loads(t), s) is None  # noqa: E731
        jobs.append((f"chat-stream-{i}", lambda b=body: _stream(chat, {**b, "stream": True}),
                     lambda r: _stream_texts(r, lambda ch: ch["delta"].get("content")), check))
        jobs.append((f"chat-{i}", lambda b=body: _post(chat, {**b, "seed": b["seed"] + 1000}).json(),
                     lambda r: ([c["message"]["content"] for c in r["choices"]],
                                [c["finish_reason"] for c in r["choices"]]), check))
    is_object = lambda t: isinstance(json.loads(t), dict)  # noqa: E731
    forms = [
        ({"response_format": {"type": "json_object"}}, is_object),
        ({"structured_outputs": {"regex": r"[a-z]{3}-\d{2}"}}, lambda t: re.fullmatch(r"[a-z]{3}-\d{2}", t)),
        ({"structured_outputs": {"choice": ["left", "right"]}}, lambda t: t in ("left", "right")),
        ({"structured_outputs": {"grammar": 'root ::= ("a" | "b"){2,4} "!"'}}, lambda t: re.fullmatch("[ab]{2,4}!", t)),
        ({"structured_outputs": {"json": SCHEMAS[1]}}, lambda t: json.loads(t)["color"] in ("red", "green", "blue")),
        ({"guided_json": json.dumps(SCHEMAS[8])}, lambda t: -5 <= json.loads(t)["n"] <= 5),
        ({"guided_regex": r"(on|off),(on|off)"}, lambda t: re.fullmatch("(on|off),(on|off)", t)),
        ({"guided_choice": ["x", "y z"]}, lambda t: t in ("x", "y z")),
        ({"guided_grammar": 'root ::= [0-9]{2} "/" [0-9]{2}'}, lambda t: re.fullmatch(r"\d\d/\d\d", t)),
    ]
    for i, (fields, check) in enumerate(forms):
        body = {**common, "prompt": "Answer:", "seed": 100 + i, **fields}
        if i % 2:
            jobs.append((f"completions-stream-{i}", lambda b=body: _stream(completions, {**b, "stream": True}),
                         lambda r: _stream_texts(r, lambda ch: ch["text"]), check))
        else:
            jobs.append((f"completions-{i}", lambda b=body: _post(completions, b).json(),
                         lambda r: ([c["text"] for c in r["choices"]], [c["finish_reason"] for c in r["choices"]]),
                         check))
    generate = f"{server.url}/generate"
    sglang = [({"json_schema": json.dumps(SCHEMAS[12])}, lambda t: json.loads(t)["kind"] == "point"),
              ({"regex": r"#[0-9a-f]{6}"}, lambda t: re.fullmatch("#[0-9a-f]{6}", t)),
              ({"ebnf": 'root ::= "(" [xy] ")"'}, lambda t: t in ("(x)", "(y)"))]
    for i, (fields, check) in enumerate(sglang):
        body = {"text": ["Answer:"] * N, "sampling_params": {"max_new_tokens": MAX_TOKENS, "temperature": 1.0,
                                                               "sampling_seed": 200 + i, "logit_bias": bias, **fields}}
        jobs.append((f"generate-{i}", lambda b=body: _post(generate, b).json(),
                     lambda r: ([x["text"] for x in r], [x["meta_info"]["finish_reason"]["type"] for x in r]), check))
    schema = SCHEMAS[1]  # bounded: the Responses API has no logit_bias to end free strings
    responses_body = {"input": "Answer:", "max_output_tokens": MAX_TOKENS, "temperature": 1.0,
                      "text": {"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}}}
    with ThreadPoolExecutor(len(jobs) + 1) as pool:
        futures = [pool.submit(run) for _, run, _, _ in jobs]
        response = pool.submit(_post, f"{server.url}/v1/responses", responses_body)
        for (name, _, read, check), future in zip(jobs, futures):
            texts, reasons = read(future.result())
            assert len(texts) == N, name
            for text, reason in zip(texts, reasons):
                assert reason == "stop", (name, text)
                assert check(text), (name, text)
        r = response.result()
    assert r.status_code == 200, r.text
    body = r.json()
    jsonschema.validate(json.loads(body["output"][0]["content"][0]["text"]), schema)
    assert body["status"] == "completed" and body["text"]["format"]["name"] == "person"


BAD = {
    "bad-schema-type": ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
        "response_format.json_schema.schema"),
    "schema-missing": ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "json_schema"}},
                       "response_format.json_schema"),
    "bad-format-type": ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "yaml"}},
                        "response_format.type"),
    "bad-regex": ("/v1/completions", {"prompt": "a", "structured_outputs": {"regex": "[a-"}},
                  "structured_outputs.regex"),
    "bad-grammar": ("/v1/completions", {"prompt": "a", "structured_outputs": {"grammar": "root ::= undefined"}},
                    "structured_outputs.grammar"),
    "empty-choice": ("/v1/completions", {"prompt": "a", "guided_choice": []}, "guided_choice"),
    "guided-json-not-json": ("/v1/completions", {"prompt": "a", "guided_json": "{nope"}, "guided_json"),
    "two-constraints": ("/v1/completions", {"prompt": "a", "guided_regex": "a", "response_format": {
        "type": "json_object"}}, "guided_regex"),
    "structured-unknown-field": ("/v1/completions", {"prompt": "a", "structured_outputs": {"structural_tag": "x"}},
                                 "structured_outputs.structural_tag"),
    "responses-bad-schema": ("/v1/responses", {"input": "a", "text": {"format": {
        "type": "json_schema", "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}},
        "text.format.schema"),
    "generate-bad-ebnf": ("/generate", {"text": "a", "sampling_params": {"ebnf": "rot ::= \"a\""}},
                          "sampling_params.ebnf"),
    "generate-bad-schema": ("/generate", {"text": "a", "sampling_params": {"json_schema": "{\"type\": \"frob\"}"}},
                            "sampling_params.json_schema"),
    # keywords the grammar would not enforce: refused instead of answered with output that breaks them
    "unenforced-uniqueItems": ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}},
        "response_format.json_schema.schema"),
    "unenforced-nested-not": ("/v1/completions", {"prompt": "a", "structured_outputs": {"json": {
        "type": "object", "properties": {"a": {"not": {"type": "integer"}}}}}}, "structured_outputs.json"),
    "unknown-format": ("/v1/completions", {"prompt": "a", "guided_json": {"type": "string", "format": "frob"}},
                       "guided_json"),
    "pattern-and-length": ("/generate", {"text": "a", "sampling_params": {"json_schema": json.dumps(
        {"type": "string", "pattern": "^[a-z]+$", "maxLength": 3})}}, "sampling_params.json_schema"),
    # a language with no text in it: nothing could be sampled
    "empty-language": ("/v1/completions", {"prompt": "a", "structured_outputs": {"regex": "[^\\x00-\\U0010FFFF]"}},
                       "structured_outputs.regex"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_invalid_constraints_are_400_and_the_server_stays_healthy(server, case):
    path, body, param = BAD[case]
    r = _post(f"{server.url}{path}", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"], err
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
