"""A real ``launch_server.py`` with sp=2 x tp=2 on CPU (4 ranks on gloo): the same greedy outputs as the offline
API at sp=1, tp=1; concurrency; a killed worker rank fails in-flight requests; shutdown leaves no process."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import httpx
import openai
import pytest

from server import LLM, SamplingParams
from tests.helpers import (
    descendants,
    engine_pid,
    kill_and_check_in_flight_requests_fail,
    sse_events,
    start_server,
    wait_gone,
    worker_pids,
)

# Prompts of at least --sp-min-tokens tokens are prefilled split over the SP group (ring attention, LASP).
PARALLEL_ARGS = ["--device", "cpu", "--cpu-cache-gb", "0.1", "--sp-size", "2", "--tp-size", "2",
                 "--sp-min-tokens", "16"]
PROMPTS = [
    "The town sits where two rivers meet, and most of its streets run downhill toward the water.",
    "Questions about the future are answered with a shrug",
    "Hi",
    "Cooking in this part of the country is simple. You take what the garden gives you, add salt, oil and a "
    "little patience, and let the pot do the rest.",
]


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("profiles")


@pytest.fixture(scope="module")
def server(tmp_path_factory, profile_dir):
    srv = start_server(PARALLEL_ARGS + ["--profile-dir", str(profile_dir)], tmp_path_factory.mktemp("srv") / "log")
    tree = descendants(srv.proc.pid)
    yield srv
    assert srv.stop(signal.SIGINT) == 0, srv.log()
    assert wait_gone(tree) == []  # engine, 3 worker ranks, helpers


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def reference():
    """Greedy outputs of the offline API with sp=1, tp=1."""
    llm = LLM(device="cpu", cpu_cache_gb=0.1)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    llm.engine.shutdown()
    return outs


def test_greedy_completions_match_single_device(client, reference):
    for prompt, ref in zip(PROMPTS, reference, strict=True):
        out = client.completions.create(model="builtin", prompt=prompt, max_tokens=12, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == ref.text
        assert out.usage.prompt_tokens == len(ref.prompt_token_ids)


def test_chat_stream_n_and_seed(client):
    kw = dict(model="builtin", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=6, n=2, seed=11,
              temperature=0.8, stream=True, extra_body={"ignore_eos": True})

    def run() -> dict[int, str]:
        texts = {0: "", 1: ""}
        for chunk in client.chat.completions.create(**kw):
            for ch in chunk.choices:
                texts[ch.index] += ch.delta.content or ""
        return texts

    first = run()
    assert first == run()
    assert first[0] != first[1]


def test_concurrent_streams_match_reference(server, reference):
    async def one(http: httpx.AsyncClient, prompt: str) -> str:
        body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True, "ignore_eos": True}
        async with http.stream("POST", "/v1/completions", json=body) as r:
            events = [json.loads(e) for e in sse_events(await r.aread())]
        return "".join(e["choices"][0]["text"] for e in events)

    async def run_all() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as http:
            return await asyncio.gather(*(one(http, p) for p in PROMPTS * 2))

    assert asyncio.run(run_all()) == [r.text for r in reference] * 2


def test_profile_every_rank_over_http(server, client, profile_dir):
    """POST /start_profile and /stop_profile: all four ranks (sp 2 x tp 2) write a trace of the request between."""
    def post(path: str, **kw) -> httpx.Response:
        return httpx.post(f"{server.url}{path}", timeout=300, **kw)

    r = post("/stop_profile")
    assert r.status_code == 400 and "no profile is running" in r.json()["error"]["message"]
    r = post("/start_profile", json={"output_dir": "/tmp"})  # the directory is the server's flag, not a field
    assert r.status_code == 400 and r.json()["error"]["param"] == "output_dir"
    assert post("/start_profile", json={"record_shapes": "yes"}).status_code == 400
    r = post("/start_profile", json={"num_steps": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "num_steps"
    r = post("/start_profile")
    assert r.status_code == 200 and r.json() == {"status": "started", "output_dir": str(profile_dir.resolve())}
    assert post("/start_profile", json={}).status_code == 400  # one at a time
    out = client.completions.create(model="builtin", prompt=PROMPTS[3], max_tokens=4, temperature=0)
    assert out.choices[0].text
    r = post("/stop_profile")
    assert r.status_code == 200, r.text
    ranks = r.json()["ranks"]
    assert [x["rank"] for x in ranks] == [0, 1, 2, 3]
    for x in ranks:
        assert "error" not in x and x["host_op_ms"] > 0, x
        assert Path(x["trace"]).parent == profile_dir.resolve() and Path(x["trace"]).stat().st_size > 0
        assert "aten::" in Path(x["ops"]).read_text()


def test_killed_worker_rank_fails_requests_and_health(tmp_path):
    srv = start_server(PARALLEL_ARGS, tmp_path / "log")
    try:
        ranks = worker_pids(engine_pid(srv.proc.pid))
        assert len(ranks) == 3
        kill_and_check_in_flight_requests_fail(srv, ranks[0])
    finally:
        srv.stop()
