"""Prometheus text exposition of the server metrics."""

from __future__ import annotations

import re

from server.engine.io_struct import EngineStats
from server.entrypoints.metrics import Histogram, ServerMetrics


def test_histogram_buckets_are_cumulative():
    h = Histogram("x_seconds", "x", buckets=(0.01, 0.1, 1.0))
    values = [0.005, 0.01, 0.05, 0.5, 0.5, 7.0]
    for v in values:
        h.observe(v)
    text = "\n".join(h.render())
    for le in ("0.01", "0.1", "1.0"):
        want = sum(v <= float(le) for v in values)  # Prometheus buckets count observations <= le
        assert f'server_x_seconds_bucket{{le="{le}"}} {want}' in text
    assert 'server_x_seconds_bucket{le="+Inf"} 6' in text
    assert f"server_x_seconds_sum {sum(values)}" in text and "server_x_seconds_count 6" in text


def test_server_metrics_render():
    m = ServerMetrics()
    m.set_engine_stats(EngineStats(num_running=2, num_waiting=1, kv_pages_used=5, kv_pages_total=20,
                                   state_slots_used=2, state_slots_total=8))
    m.on_finish("stop", 7, 0.5)
    m.on_finish("length", 3, 0.25)
    text = m.render()
    assert text.endswith("\n")
    assert 'server_requests_total{finish_reason="length"} 1.0' in text
    assert "server_prompt_tokens_total 10.0" in text
    assert "server_kv_cache_usage_ratio 0.25" in text and "server_state_pool_usage_ratio 0.25" in text
    for line in text.splitlines():  # every sample line: name{labels} value
        assert line.startswith("# ") or re.fullmatch(r'[a-z0-9_:]+(\{[a-z_]+="[^"]*"\})? \S+', line), line
