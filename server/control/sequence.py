"""A request as the scheduler tracks it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from server.messages import PromptTokenLogprob
from server.runs import Run
from server.sampling_params import SamplingParams


class Status(enum.Enum):
    """Where a request is in its life: waiting for admission, running, finished."""

    WAITING = 0
    RUNNING = 1
    FINISHED = 2


@dataclass
class Sequence:
    """One request as rank 0's scheduler tracks it: tokens, placement, pages and runs per SP rank, slot, limits."""

    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    sp_size: int
    req: int = -1  # the engine's request index, the key of the workers' mirrors
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose KV/state is in the caches
    slot: int = -1  # state slot (linear-attention layers; also the row of the page tables)
    home: int | None = None  # SP rank that computes and stores the whole request (short prompts)
    # SP rank that stores the KV of this request's next unsplit tokens: its home when homed, else the rank chosen
    # for its replicated tokens (rotates as pages fill, see Scheduler.replicated_kv_rank)
    kv_rank: int = 0
    max_new_tokens: int = 0  # output tokens allowed: max_tokens within the context (Scheduler.add)
    reserved_tokens: list[int] = field(default_factory=list)  # KV tokens reserved per SP rank at admission
    arrival: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    kv_runs: list[list[Run]] = field(default_factory=list)  # per SP rank, rows of its shard
    pages: list[list[int]] = field(default_factory=list)  # per SP rank
    use_prefix_cache: bool = True  # look up a cached prefix at admission (prompt scoring needs every position)
    cached_tokens: int = 0  # prompt tokens that came from the prefix cache
    restored: bool = False  # the state slot starts from a cached snapshot, not from zeros
    prefix_entry: object | None = None  # the prefix-cache entry whose pages it shares
    snapshots: dict[int, int] = field(default_factory=dict)  # state snapshots saved along the way: tokens -> slot
    # where its prompt leaves a cached one (linear-attention models): a prefill chunk ends there, so the state at
    # that point is snapshotted for the next request that shares the same prefix
    snapshot_at: int | None = None
    # the prompt's chain hashes for the prefix cache (computed once: a waiting request is looked up at every step,
    # and its entry, when it ends, starts with the same blocks)
    prompt_hashes: list[int] | None = None
    # models with a window page group (server/control/cache_manager.py), per SP rank: the window layers' pages
    # (NULL_PAGE where given back), the entries given back since its last chunk plan, the first page not yet
    # examined for giving back; and the token counts whose window the request keeps for the prefix cache
    window_pages: list[list[int]] = field(default_factory=list)
    window_freed: list[list[int]] = field(default_factory=list)
    window_scan: list[int] = field(default_factory=list)
    window_points: set[int] = field(default_factory=set)
    # prompt logprobs computed so far (SamplingParams.prompt_logprobs), None for the first token; handed to the
    # output of the first generated token, then dropped here
    prompt_logprobs: list[PromptTokenLogprob | None] | None = None

    def __post_init__(self) -> None:
        self.kv_runs = [[] for _ in range(self.sp_size)]
        self.pages = [[] for _ in range(self.sp_size)]

    def token_ids(self, start: int, n: int) -> list[int]:
        """Tokens ``start..start+n-1`` of prompt + output, without concatenating the two (prompts can be long)."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p : start - p + n]
        return self.prompt_ids[start : start + n] + self.output_ids[: max(0, start + n - p)]

    @property
    def token_in_flight(self) -> bool:
        """The last output token is still on the device: a placeholder ``-(i + 1)`` (see
        :class:`server.engine.engine.InFlight`)."""
        return bool(self.output_ids) and self.output_ids[-1] < 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefilling(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    def shard_len(self, sp_rank: int) -> int:
        return sum(n for _, n, _ in self.kv_runs[sp_rank])
