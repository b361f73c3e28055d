"""A real ``launch_server.py`` on a tiny saved Llama checkpoint, with ``--api-key`` and a bounded queue: greedy
outputs against a transformers greedy loop and the offline API, 401 without the key, 429 when the queue is full."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import openai
import pytest
import torch

from server import LLM, SamplingParams
from server.models.builtin import builtin_model_path
from server.tokenizer import Tokenizer
from tests.entrypoints.server_testing import prometheus_value, start_server
from tests.helpers import hf_model, save_tiny_model

KEY = "sekret-key"
NAME = "tiny-llama"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["The harbour master reads tide tables", "Nobody is in a hurry, yet", "7"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    """A random Llama saved by transformers, with the built-in model's tokenizer files copied in."""
    path = save_tiny_model("llama", str(tmp_path_factory.mktemp("ckpt")), vocab_size=2048,
                           max_position_embeddings=8192)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{builtin_model_path()}/{name}", f"{path}/{name}")
    return path


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    args = ["--device", "cpu", "--model-path", model_path, "--served-model-name", NAME, "--api-key", KEY,
            "--max-running-requests", "1", "--max-waiting-requests", "1", "--cpu-cache-gb", "0.1"]
    srv = start_server(args, tmp_path_factory.mktemp("srv") / "log")
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy continuation by argmax over transformers' full-sequence logits (no cache, no stop tokens)."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def test_api_key(server, client):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.completions.create(model=NAME, prompt="hi", max_tokens=2).choices[0].finish_reason
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200


def test_greedy_matches_transformers_and_offline(server, client, model_path):
    tok = Tokenizer.from_pretrained(model_path)
    hf = hf_model(model_path)
    llm = LLM(model_path=model_path, device="cpu", cpu_cache_gb=0.05)
    try:
        offline = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
                               use_tqdm=False)
    finally:
        llm.engine.shutdown()
    for prompt, ref in zip(PROMPTS, offline, strict=True):
        ids = tok.encode(prompt)
        body = {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}}
        native = httpx.post(f"{server.url}/generate", json=body, headers=AUTH, timeout=60).json()
        assert native["output_ids"] == hf_greedy(hf, ids, 16) == ref.token_ids
        out = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == ref.text == tok.decode(ref.token_ids)


def test_chat_streaming_equals_non_streaming(client):
    kw = dict(model=NAME, messages=[{"role": "user", "content": "Where is the ferry?"}], max_tokens=8,
              temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"


def _metric(server, name: str) -> float:
    return prometheus_value(httpx.get(f"{server.url}/metrics").text, name)


def _wait_metric(server, name: str, value: float, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while _metric(server, name) != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.05)


def test_full_queue_answers_429_with_retry_after(server):
    """One request running and one waiting fill --max-running-requests 1 + --max-waiting-requests 1."""
    url = f"{server.url}/v1/completions"
    long = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 8000, "ignore_eos": True}
    queued: dict[str, httpx.Response] = {}
    with httpx.stream("POST", url, json={**long, "stream": True}, headers=AUTH, timeout=60) as running:
        lines = running.iter_lines()  # dropping this iterator would close the connection
        assert next(lines).startswith("data: ")
        waiter = threading.Thread(target=lambda: queued.setdefault(
            "r", httpx.post(url, json={**long, "max_tokens": 8}, headers=AUTH, timeout=120)))
        waiter.start()
        _wait_metric(server, "server_num_requests_waiting", 1)
        r = httpx.post(url, json={**long, "max_tokens": 1}, headers=AUTH)
        assert r.status_code == 429
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "queue_full"
    waiter.join(timeout=120)  # closing the stream aborted the running request, so the queued one ran
    assert queued["r"].status_code == 200
    _wait_metric(server, "server_requests_in_flight", 0)
    r = httpx.post(url, json={**long, "max_tokens": 2}, headers=AUTH)
    assert r.status_code == 200
