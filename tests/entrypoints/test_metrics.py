"""Prometheus exposition of the server metrics (prometheus_client), without a server."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

from server.entrypoints.metrics import ServerMetrics
from server.messages import EngineStats, StepCounts


def test_server_metrics_render_and_parse():
    m = ServerMetrics()
    m.set_engine_stats(EngineStats(num_running=2, num_waiting=1, kv_pages_used=5, kv_pages_total=20,
                                   state_slots_used=2, state_slots_total=8, num_steps=1,
                                   last_step=StepCounts(3, 100, 2, 1, 1)))
    m.set_engine_stats(EngineStats(num_steps=1, last_step=StepCounts(3, 100, 2, 1, 1)))  # the same step again
    m.set_engine_stats(EngineStats(num_steps=2, last_step=StepCounts(2, 0, 2, 0, 0)))
    m.on_finish("stop", 7, 0.5)
    m.on_finish("length", 3, 0.25)
    for value in (0.005, 0.5, 7.0):
        m.ttft.observe(value)
    text = m.render().decode()
    assert 'server_requests_total{finish_reason="length"} 1.0' in text
    assert 'server_requests_total{finish_reason="abort"} 0.0' in text  # every reason is there from the start
    assert "server_prompt_tokens_total 10.0" in text
    assert "server_engine_steps_total 2.0" in text
    assert "server_step_requests_count 2.0" in text and "server_step_requests_sum 5.0" in text
    assert "server_step_prefill_tokens_sum 100.0" in text and "server_step_decode_tokens_sum 4.0" in text
    assert 'server_sp_placements_total{placement="split"} 1.0' in text
    assert 'server_time_to_first_token_seconds_bucket{le="0.01"} 1.0' in text  # cumulative buckets
    assert 'server_time_to_first_token_seconds_bucket{le="+Inf"} 3.0' in text
    assert "_created" not in text
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families["server_requests"] == "counter" and families["server_kv_cache_usage_ratio"] == "gauge"
    assert families["server_e2e_request_latency_seconds"] == "histogram"
    for line in text.splitlines():  # every sample line: name{labels} value
        assert line.startswith("# ") or re.fullmatch(r'[a-z0-9_:]+(\{[a-z_]+="[^"]*"\})? \S+', line), line
