"""The prefix cache over HTTP (built-in model, a real server): ``usage.prompt_tokens_details.cached_tokens`` in
completions and chat (and the streamed usage chunk), ``meta_info.cached_tokens`` of /generate, the Prometheus
counters of cached and computed prompt tokens and the cache's size, POST /flush_cache, and the outputs equal to
a server without the cache."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.helpers import openai_client, prometheus_value, sse_events, start_server

# 96-token prefill chunks: the built-in model is a hybrid (lightning + softmax), whose matches stop at the state
# snapshots taken at chunk ends.
ARGS = ["--device", "cpu", "--cpu-cache-gb", "0.1", "--chunked-prefill-size", "96"]
DOC = "The town sits where two rivers meet and most of its streets run downhill toward the water. " * 12
GREEDY = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("srv")
    on = start_server(ARGS, root / "on.log")
    off = start_server([*ARGS, "--disable-prefix-cache"], root / "off.log")
    yield on, off
    assert on.stop() == 0 and off.stop() == 0


def test_cached_tokens_are_reported_and_outputs_unchanged(servers):
    on, off = servers
    c_on, c_off = openai_client(on), openai_client(off)
    first = c_on.completions.create(model="builtin", prompt=DOC + "First question?", extra_body={"ignore_eos": True},
                                    max_tokens=6, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = c_on.completions.create(model="builtin", prompt=DOC + "Second question?", max_tokens=6, temperature=0,
                                     extra_body={"ignore_eos": True})
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and cached % 96 == 0 and cached < second.usage.prompt_tokens  # a chunk end inside the doc
    ref = c_off.completions.create(model="builtin", prompt=DOC + "Second question?", max_tokens=6, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert second.choices[0].text == ref.choices[0].text
    assert ref.usage.prompt_tokens_details.cached_tokens == 0
    # chat, streamed: the usage chunk carries it too
    messages = [{"role": "user", "content": DOC}]
    c_on.chat.completions.create(model="builtin", messages=messages, max_tokens=2, temperature=0)
    chunks = list(c_on.chat.completions.create(model="builtin", messages=messages, max_tokens=2, temperature=0,
                                               stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
    # the native endpoint, streamed
    with httpx.stream("POST", f"{on.url}/generate", timeout=60, json={
            "text": DOC + "Third?", "sampling_params": {"max_new_tokens": 3, "temperature": 0}, "stream": True}) as r:
        events = [json.loads(e) for e in sse_events(r.read())]
    assert events[-1]["meta_info"]["cached_tokens"] > 0


def test_metrics_and_flush(servers):
    on, _ = servers
    m = httpx.get(f"{on.url}/metrics").text
    cached, computed = (prometheus_value(m, f"server_prompt_tokens_{k}_total") for k in ("cached", "computed"))
    assert cached > 0 and computed > 0
    assert cached + computed == prometheus_value(m, "server_prompt_tokens_total")
    assert prometheus_value(m, "server_prefix_cache_entries") > 0
    assert prometheus_value(m, "server_prefix_cache_pages") > 0
    r = httpx.post(f"{on.url}/flush_cache", timeout=30)
    assert r.status_code == 200 and r.json()["flushed_entries"] > 0
    # the next step's stats show an empty cache (a request makes the engine send them)
    httpx.post(f"{on.url}/v1/completions", json={"prompt": "hi", **GREEDY}, timeout=60)
    m = httpx.get(f"{on.url}/metrics").text
    assert prometheus_value(m, "server_prefix_cache_pages") > 0  # the request just ended is cached again
    assert prometheus_value(m, "server_kv_cache_pages_used") == 0  # nothing running holds pages
