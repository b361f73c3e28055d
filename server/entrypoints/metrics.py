"""Prometheus metrics of the HTTP server, kept and rendered by ``prometheus_client`` (text format 0.0.4).

Request-level numbers (tokens, latencies) are measured in the HTTP process; queue lengths, cache usage and the
per-step counts (batch size, prefill and decode tokens, SP placements) come from the engine's ``EngineStats``,
which it sends after every step. Names follow Prometheus conventions: a ``server_`` prefix, base units
(``_seconds``, ``_ratio``), ``_total`` on counters. Each ``ServerMetrics`` has its own registry.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from server.messages import EngineStats

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_PLAIN_0_0_4
PREFIX = "server_"
FINISH_REASONS = ("stop", "length", "abort", "error", "rejected")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
COUNT_BUCKETS = tuple(2.0**i for i in range(11))  # 1 .. 1024 requests per step
TOKEN_BUCKETS = tuple(4.0**i for i in range(10))  # 1 .. 262144 tokens per step

prometheus_client.disable_created_metrics()  # no *_created series: nothing here needs them


class ServerMetrics:
    """Every metric ``GET /metrics`` shows. One choice of an ``n > 1`` request counts as one request."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = {"registry": self.registry}

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, **r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> Histogram:
            return Histogram(PREFIX + name, doc, buckets=buckets, **r)

        self.requests = Counter(PREFIX + "requests", "Finished requests by finish reason.", ["finish_reason"], **r)
        for reason in FINISH_REASONS:
            self.requests.labels(finish_reason=reason)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished requests.", **r)
        self.prompt_cached = Counter(PREFIX + "prompt_tokens_cached", "Prompt tokens of finished requests that the "
                                     "prefix cache served.", **r)
        self.prompt_computed = Counter(PREFIX + "prompt_tokens_computed", "Prompt tokens of finished requests that "
                                       "were computed (not served by the prefix cache).", **r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens.", **r)
        self.ttft = histogram("time_to_first_token_seconds", "From request arrival to its first generated token.")
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive generated tokens.")
        self.e2e = histogram("e2e_request_latency_seconds", "From request arrival to its last token.")
        self.in_flight = gauge("requests_in_flight", "Requests the HTTP server is waiting on.")
        self.running = gauge("num_requests_running", "Requests the engine is running.")
        self.waiting = gauge("num_requests_waiting", "Requests queued in the engine.")
        self.kv_used = gauge("kv_cache_pages_used", "KV cache pages in use (every SP rank).")
        self.kv_total = gauge("kv_cache_pages_total", "KV cache pages (every SP rank).")
        self.kv_usage = gauge("kv_cache_usage_ratio", "Fraction of KV cache pages in use.")
        self.state_used = gauge("state_pool_slots_used", "Linear-attention state slots in use.")
        self.state_total = gauge("state_pool_slots_total", "Linear-attention state slots.")
        self.state_usage = gauge("state_pool_usage_ratio", "Fraction of linear-attention state slots in use.")
        self.healthy = gauge("engine_healthy", "1 while every engine process is up and ready, else 0.")
        self.kv_cached = gauge("prefix_cache_pages", "KV cache pages only the prefix cache holds (evictable), every "
                               "SP rank.")
        self.cache_entries = gauge("prefix_cache_entries", "Ended requests whose prefix the cache keeps.")
        self.steps = Counter(PREFIX + "engine_steps", "Engine steps (forward passes) run.", **r)
        self.step_requests = histogram("step_requests", "Requests in one engine step (batch size).", COUNT_BUCKETS)
        self.step_prefill = histogram("step_prefill_tokens", "Prompt tokens computed in one engine step.",
                                      TOKEN_BUCKETS)
        self.step_decode = histogram("step_decode_tokens", "Tokens decoded in one engine step.", COUNT_BUCKETS)
        self.sp_placements = Counter(PREFIX + "sp_placements", "Requests of engine steps by SP placement: split "
                                     "over the SP group, or computed on their home SP rank.", ["placement"], **r)
        rank = ["rank", "sp_rank", "tp_rank"]
        self.rank_weights = Gauge(PREFIX + "rank_weight_bytes", "Weight bytes each rank stores.", rank, **r)
        self.rank_gather = Gauge(PREFIX + "rank_gather_buffer_bytes", "Bytes of the buffers each rank gathers its "
                                 "SP-sharded dense weights into (--shard-dense-weights).", rank, **r)
        self.rank_kv = Gauge(PREFIX + "rank_kv_cache_bytes", "KV cache bytes each rank allocated.", rank, **r)
        self.rank_state = Gauge(PREFIX + "rank_state_bytes", "Linear-attention state pool bytes each rank allocated.",
                                rank, **r)
        self.expert_pairs = Counter(PREFIX + "expert_rank_pairs", "Expert parallel: (token, expert) pairs each rank "
                                    "computed, summed over the MoE layers (eager steps at once; graph-form decode "
                                    "steps every 64 steps).", ["ep_rank"], **r)
        self.expert_pairs_last = gauge("expert_rank_pairs_last_step", "Expert parallel: (token, expert) pairs each "
                                       "rank computed in the latest eager step.", ("ep_rank",))
        self._num_steps = 0

    def set_rank_memory(self, ranks: list[dict]) -> None:
        """Every rank's footprint (``Engine.memory_stats``), once the engine is ready."""
        for m in ranks:
            labels = {"rank": str(m["rank"]), "sp_rank": str(m["sp_rank"]), "tp_rank": str(m["tp_rank"])}
            self.rank_weights.labels(**labels).set(m["weight_bytes"])
            self.rank_gather.labels(**labels).set(m["gather_buffer_bytes"])
            self.rank_kv.labels(**labels).set(m["kv_cache_bytes"])
            self.rank_state.labels(**labels).set(m["state_bytes"])

    def set_engine_stats(self, s: EngineStats) -> None:
        self.running.set(s.num_running)
        self.waiting.set(s.num_waiting)
        self.kv_used.set(s.kv_pages_used)
        self.kv_total.set(s.kv_pages_total)
        self.kv_usage.set(s.kv_pages_used / s.kv_pages_total if s.kv_pages_total else 0.0)
        self.state_used.set(s.state_slots_used)
        self.state_total.set(s.state_slots_total)
        self.state_usage.set(s.state_slots_used / s.state_slots_total if s.state_slots_total else 0.0)
        self.kv_cached.set(s.kv_pages_cached)
        self.cache_entries.set(s.prefix_cache_entries)
        if s.num_steps > self._num_steps:  # a new step (the engine sends its stats after each one)
            self.steps.inc(s.num_steps - self._num_steps)
            self._num_steps = s.num_steps
            step = s.last_step
            self.step_requests.observe(step.batch_size)
            self.step_prefill.observe(step.prefill_tokens)
            self.step_decode.observe(step.decode_tokens)
            self.sp_placements.labels(placement="split").inc(step.sp_split)
            self.sp_placements.labels(placement="homed").inc(step.sp_homed)
            for rank, pairs in enumerate(step.expert_pairs):
                self.expert_pairs.labels(ep_rank=str(rank)).inc(pairs)
                self.expert_pairs_last.labels(ep_rank=str(rank)).set(pairs)
            for rank, pairs in enumerate(step.expert_graph_pairs):
                self.expert_pairs.labels(ep_rank=str(rank)).inc(pairs)

    def on_finish(self, finish_reason: str, prompt_tokens: int, e2e_s: float | None, cached_tokens: int = 0) -> None:
        self.requests.labels(finish_reason=finish_reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.prompt_cached.inc(cached_tokens)
        self.prompt_computed.inc(prompt_tokens - cached_tokens)
        if e2e_s is not None:
            self.e2e.observe(e2e_s)

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)
