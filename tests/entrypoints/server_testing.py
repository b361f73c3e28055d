"""Run ``launch_server.py`` as a real subprocess for the server tests, and read its process tree from /proc."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 300.0  # CI machines are small and shared; model load and process start-up vary a lot


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, grandchildren, ...), from /proc."""
    parent_of = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if fields[0] not in ("Z", "X"):
                parent_of[int(entry)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent_of.items() if pp == p]
        found += kids
        frontier += kids
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


class ServerProcess:
    """``python launch_server.py ARGS --port 0``; the port is read from the server's log."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "launch_server.py", "--port", "0", *args],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.url = ""

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if not self.url:
                m = re.search(r"listening on (http://[\d.]+:\d+)", self.log())
                self.url = m.group(1) if m else ""
            if self.url:
                try:
                    if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"server not healthy after {timeout} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in descendants(self.proc.pid):
                    os.kill(pid, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def start_server(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> ServerProcess:
    """``launch_server.py ARGS``, healthy; ``env`` is added to this process's environment."""
    return ServerProcess(args, log_path, env).wait_ready()


def openai_client(srv: ServerProcess):
    """The official SDK against ``srv``: no retries (a failure is the result), a generous timeout for CPU runs."""
    import openai

    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=120)


def prometheus_value(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def sse_events(raw: bytes) -> list[str]:
    """Split an SSE body into its ``data:`` payloads, asserting OpenAI's exact framing."""
    text = raw.decode()
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    blocks = text.split("\n\n")
    assert blocks[-1] == ""
    payloads = []
    for block in blocks[:-1]:
        assert block.startswith("data: ") and "\n" not in block, repr(block)
        payloads.append(block[len("data: "):])
    assert payloads.count("[DONE]") == 1
    return payloads[:-1]


def engine_pid(server_pid: int) -> int:
    """The engine process: the server's spawned child that leads its own process group."""
    [pid] = [p for p in descendants(server_pid) if os.getpgid(p) == p and b"spawn_main" in _cmdline(p)]
    return pid


def worker_pids(engine: int) -> list[int]:
    """Ranks 1..W-1: the engine's spawned children."""
    return sorted(p for p in descendants(engine) if b"spawn_main" in _cmdline(p))


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def wait_gone(pids: list[int], timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def kill_and_check_in_flight_requests_fail(srv: ServerProcess, victim: int) -> None:
    """With one streaming and one non-streaming request in flight, SIGKILL ``victim``: both get an error within
    seconds, /health turns 503 and stays there, new requests get 503; then SIGTERM leaves no process behind."""
    body = {"prompt": "The town sits " * 20, "max_tokens": 4000, "ignore_eos": True}
    blocking: dict[str, httpx.Response] = {}
    t = threading.Thread(target=lambda: blocking.setdefault(
        "r", httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)))
    t.start()
    tree = descendants(srv.proc.pid)
    with httpx.stream("POST", f"{srv.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
        while prometheus_value(httpx.get(f"{srv.url}/metrics").text, "server_requests_in_flight") < 2:
            time.sleep(0.05)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        rest = [line for line in lines if line]
    assert time.monotonic() - killed_at < 10
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2][len("data: "):])["error"]
    assert error["type"] == "server_error" and error["code"] == "engine_dead"
    t.join(timeout=10)
    assert blocking["r"].status_code == 500 and blocking["r"].json()["error"]["code"] == "engine_dead"
    for _ in range(2):
        health = httpx.get(f"{srv.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        again = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        assert again.status_code == 503 and again.json()["error"]["code"] == "engine_dead"
        time.sleep(0.5)
    assert srv.stop(signal.SIGTERM) == 0
    assert wait_gone(tree) == []
