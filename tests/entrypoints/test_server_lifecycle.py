"""Start-up errors, the death of the engine process, and shutdown of a real ``launch_server.py``."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import (
    REPO,
    descendants,
    engine_pid,
    kill_and_check_in_flight_requests_fail,
    start_server,
    wait_gone,
)


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--page-size", "3"], "--page-size"),
        (["--mem-fraction-static", "1.5"], "--mem-fraction-static"),
        (["--max-waiting-requests", "-1"], "--max-waiting-requests"),
        (["--model-path", "/nonexistent/model"], "--model-path"),
        (["--watchdog-timeout", "0"], "--watchdog-timeout"),
        (["--max-request-bytes", "10"], "--max-request-bytes"),
        (["--sp-size", "4", "--ulysses-degree", "3"], "--ulysses-degree"),
        (["--device", "cpu", "--sp-size", "8", "--ulysses-degree", "8"], "--ulysses-degree"),  # 4 heads
    ],
)
def test_invalid_flags_exit_2_with_one_line(args, flag):
    r = subprocess.run([sys.executable, "launch_server.py", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch_server.py: error: ") and flag in lines[0], r.stderr


def test_engine_process_death_fails_requests_and_health(tmp_path):
    srv = start_server(["--device", "cpu", "--cpu-cache-gb", "0.1"], tmp_path / "log")
    try:
        kill_and_check_in_flight_requests_fail(srv, engine_pid(srv.proc.pid))
    finally:
        srv.stop()


def test_sigint_stops_everything_at_once_when_idle(tmp_path):
    """Nothing in flight: no grace period to wait (60 s here), the engine and the server exit in seconds."""
    srv = start_server(["--device", "cpu", "--cpu-cache-gb", "0.1", "--shutdown-grace-period", "60"], tmp_path / "log")
    tree = descendants(srv.proc.pid)
    assert tree
    start = time.monotonic()
    assert srv.stop(signal.SIGINT) == 0, srv.log()
    elapsed = time.monotonic() - start
    assert wait_gone(tree) == []
    assert elapsed < 10, f"an idle shutdown took {elapsed:.1f} s"


def test_killed_server_takes_engine_and_ranks_along(tmp_path):
    """SIGKILL gives the server no chance to clean up: the parent-death signal ends the engine, then its ranks."""
    srv = start_server(["--device", "cpu", "--cpu-cache-gb", "0.1", "--sp-size", "2"], tmp_path / "log")
    tree = descendants(srv.proc.pid)
    assert len(tree) >= 2  # the engine (rank 0) and rank 1
    srv.proc.kill()
    srv.proc.wait()
    assert wait_gone(tree) == []
    srv.stop()
