"""Messages between the HTTP process and the engine (rank 0), and the engine's per-step outputs.

Small typed dataclasses, pickled over zmq; ``tests/test_messages.py`` round-trips them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.layers.sampler import TokenLogprob
from server.sampling_params import SamplingParams


@dataclass
class GenerateRequest:
    """A tokenized request. ``rid`` is unique per engine; the HTTP side makes one per choice when n > 1."""

    rid: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams


@dataclass
class AbortRequest:
    """A client asks to stop a request (the HTTP process to the engine process)."""

    rid: str


@dataclass
class FlushCache:
    """Drop every prefix-cache entry no running request uses; the engine answers :class:`CacheFlushed`."""


@dataclass
class CacheFlushed:
    """The engine's answer to a flush: how many prefix-cache entries were dropped."""

    entries: int


@dataclass
class ProfileControl:
    """Start (``start``) or stop the profiler on every rank; the engine answers :class:`ProfileReply`."""

    start: bool
    record_shapes: bool = False
    num_steps: int | None = None  # a start: stop by itself after this many steps


@dataclass
class ProfileReply:
    """``error``: why the engine refused (None: done); ``output_dir`` of a start; ``ranks``: each rank's summary
    of a stop (``server/execution/profiler.py``)."""

    error: str | None = None
    output_dir: str | None = None
    ranks: list[dict] = field(default_factory=list)


@dataclass
class PromptTokenLogprob(TokenLogprob):
    """A prompt token's logprob given the tokens before it, its top alternatives, and its ``rank``: how many tokens
    of the vocabulary are at least as likely (vLLM's definition, so the most likely token has rank 1)."""

    rank: int = 0


@dataclass
class RequestOutput:
    """Incremental output of one request after one engine step.

    ``new_token_ids`` are the tokens produced by this step (usually one). ``finished`` is set once, with
    ``finish_reason`` in {"stop", "length", "abort", "error"}; ``error`` carries a message for the client.
    ``matched_stop`` is the stop token id that ended the request, if any. ``prompt_logprobs`` (asked with
    ``SamplingParams.prompt_logprobs``) come once, whole, on the output of the first generated token: one entry per
    prompt token, None for the first (nothing precedes it).
    """

    rid: str
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprob] | None = None
    finished: bool = False
    finish_reason: str | None = None
    matched_stop: int | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None  # set on the output carrying the first generated token
    cached_tokens: int = 0  # prompt tokens served by the prefix cache (on every output of the request)
    prompt_logprobs: list[PromptTokenLogprob | None] | None = None


class RequestRejected(ValueError):
    """A request the engine cannot serve (too long for the context or the caches). ``code`` is
    OpenAI-style, e.g. ``context_length_exceeded``."""

    def __init__(self, message: str, code: str = "invalid_request"):
        super().__init__(message)
        self.code = code


@dataclass
class StepCounts:
    """What one engine step ran: requests, new prompt tokens, decoded tokens, and how many of its requests
    were split over the SP group or computed on their home SP rank."""

    batch_size: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    sp_split: int = 0
    sp_homed: int = 0
    # expert parallel, eager steps: (token, expert) pairs each rank computed, summed over the MoE layers
    expert_pairs: tuple[int, ...] = ()
    # expert parallel, graph-form steps: the pairs each rank computed in them since the previous report (collected
    # every EXPERT_GRAPH_PAIRS_EVERY steps; empty in the other steps)
    expert_graph_pairs: tuple[int, ...] = ()


@dataclass
class EngineStats:
    """The engine after its latest step; ``num_steps`` counts steps, so every step's stats differ."""

    num_running: int = 0
    num_waiting: int = 0
    kv_pages_used: int = 0
    kv_pages_total: int = 0
    state_slots_used: int = 0
    state_slots_total: int = 0
    kv_pages_cached: int = 0  # pages only the prefix cache holds (evictable)
    prefix_cache_entries: int = 0
    prefix_cache_hit_tokens: int = 0  # prompt tokens served from the cache since start
    num_steps: int = 0
    last_step: StepCounts = field(default_factory=StepCounts)

# ---- the engine process to the HTTP process ----------------------------------------------------------------------
@dataclass
class EngineReady:
    """The engine process is ready: its pid, its workers' pids, the tokenizer, the context limit, the ranks'
    memory."""

    pid: int
    worker_pids: list[int]  # this node's ranks 1.. (other nodes watch their own)
    tokenizer_path: str
    max_model_len: int
    rank_memory: list[dict] = field(default_factory=list)  # every rank's weight, KV and state bytes (by rank)


@dataclass
class EngineStartFailed:
    """The engine process could not start (the message says why, in one line)."""

    message: str  # one line for the user
    traceback: str


@dataclass
class EngineCrashed:
    """The engine process failed after it was ready."""

    message: str
    traceback: str


@dataclass
class EngineStalled:
    """A step outlived the watchdog timeout."""

    message: str


@dataclass
class Rejection:
    """The engine refused one request (``code`` says why: queue_full, context_length_exceeded, ...)."""

    rid: str
    message: str
    code: str


@dataclass
class EngineOutputs:
    """One batch of the engine's outputs, refusals and stats, sent after each step."""

    outputs: list[RequestOutput] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    stats: EngineStats = field(default_factory=EngineStats)
