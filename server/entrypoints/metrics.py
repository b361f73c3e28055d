"""Prometheus metrics of the HTTP server, rendered in the text exposition format (version 0.0.4).

Request-level numbers (tokens, latencies) are measured in the HTTP process; queue lengths and cache usage come
from the engine's latest ``EngineStats``.
"""

from __future__ import annotations

import bisect
from collections import defaultdict

from server.engine.io_struct import EngineStats

PREFIX = "server_"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"


class Counter:
    """A monotonically increasing value per label set."""

    def __init__(self, name: str, help: str):
        self.name, self.help = PREFIX + name, help
        self.values: dict[tuple[tuple[str, str], ...], float] = defaultdict(float)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self.values[tuple(sorted(labels.items()))] += amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        values = self.values or {(): 0.0}
        lines += [f"{self.name}{_labels(k)} {v}" for k, v in sorted(values.items())]
        return lines


class Gauge:
    """A value that goes up and down."""

    def __init__(self, name: str, help: str):
        self.name, self.help = PREFIX + name, help
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = float(value)

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {self.value}"]


class Histogram:
    """Counts of observations per upper bound (``le``), cumulative as Prometheus expects, plus sum and count."""

    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.help = PREFIX + name, help
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for le, count in zip((*map(str, self.buckets), "+Inf"), self.counts, strict=True):
            total += count
            lines.append(f'{self.name}_bucket{{le="{le}"}} {total}')
        lines += [f"{self.name}_sum {self.sum}", f"{self.name}_count {total}"]
        return lines


class ServerMetrics:
    """Every metric ``GET /metrics`` shows. One choice of an ``n > 1`` request counts as one request."""

    def __init__(self) -> None:
        self.requests = Counter("requests_total", "Finished requests by finish reason.")
        self.prompt_tokens = Counter("prompt_tokens_total", "Prompt tokens of finished requests.")
        self.generation_tokens = Counter("generation_tokens_total", "Generated tokens.")
        self.ttft = Histogram("time_to_first_token_seconds", "From request arrival to its first generated token.")
        self.itl = Histogram("inter_token_latency_seconds", "Time between consecutive generated tokens.")
        self.e2e = Histogram("e2e_request_latency_seconds", "From request arrival to its last token.")
        self.in_flight = Gauge("requests_in_flight", "Requests the HTTP server is waiting on.")
        self.running = Gauge("num_requests_running", "Requests the engine is running.")
        self.waiting = Gauge("num_requests_waiting", "Requests queued in the engine.")
        self.kv_used = Gauge("kv_cache_pages_used", "KV cache pages in use (rank 0).")
        self.kv_total = Gauge("kv_cache_pages_total", "KV cache pages (rank 0).")
        self.kv_usage = Gauge("kv_cache_usage_ratio", "Fraction of KV cache pages in use.")
        self.state_used = Gauge("state_pool_slots_used", "Linear-attention state slots in use.")
        self.state_total = Gauge("state_pool_slots_total", "Linear-attention state slots.")
        self.state_usage = Gauge("state_pool_usage_ratio", "Fraction of linear-attention state slots in use.")
        self.healthy = Gauge("engine_healthy", "1 while every engine process is up and ready, else 0.")

    def set_engine_stats(self, s: EngineStats) -> None:
        self.running.set(s.num_running)
        self.waiting.set(s.num_waiting)
        self.kv_used.set(s.kv_pages_used)
        self.kv_total.set(s.kv_pages_total)
        self.kv_usage.set(s.kv_pages_used / s.kv_pages_total if s.kv_pages_total else 0.0)
        self.state_used.set(s.state_slots_used)
        self.state_total.set(s.state_slots_total)
        self.state_usage.set(s.state_slots_used / s.state_slots_total if s.state_slots_total else 0.0)

    def on_finish(self, finish_reason: str, prompt_tokens: int, e2e_s: float | None) -> None:
        self.requests.inc(finish_reason=finish_reason)
        self.prompt_tokens.inc(prompt_tokens)
        if e2e_s is not None:
            self.e2e.observe(e2e_s)

    def render(self) -> str:
        lines: list[str] = []
        for metric in vars(self).values():
            lines += metric.render()
        return "\n".join(lines) + "\n"
