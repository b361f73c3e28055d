"""The engine on rank 0: scheduler, sampling, and the drive of every rank's forward step.

The offline API (:class:`server.llm.LLM`) and the HTTP server's engine process both use it. Rank 0 runs in the
calling process; ranks 1..W-1 are spawned as children that die with it.

Faults: a fault caused by one request's data (sampling, the stop checks) ends that request with
``finish_reason="error"`` and frees its caches; the engine goes on. A fault of the forward step (a worker that
died, a device error) is the engine's and propagates.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.process
import os
import time
from dataclasses import dataclass, replace

import torch

from server.config import EngineConfig
from server.control.scheduler import Scheduler
from server.control.sequence import Sequence, Status
from server.engine.faults import inject_fault
from server.engine.grammar import GrammarMasks
from server.execution.model_runner import ScoredRows
from server.execution.procutil import free_port
from server.execution.profiler import RankProfiler
from server.execution.step_profile import PROFILE
from server.execution.worker import (
    gather_memory_stats,
    profile_rank,
    release_rank,
    send_message,
    setup_rank,
    worker_main,
)
from server.forward.plan import MemoryStatsRequest, Placement, ProfileRequest, Shutdown
from server.layers.sampler import SampledBatch, SampleRequest, sample, sample_async
from server.messages import (
    EngineStats,
    GenerateRequest,
    PromptTokenLogprob,
    RequestOutput,
    RequestRejected,
    StepCounts,
)
from server.models.builtin import builtin_model_path
from server.models.config import ModelConfig
from server.models.loader import check_model_parallelism, context_length, read_model_config
from server.sampling_params import SamplingParams

log = logging.getLogger(__name__)

# Expert parallel: every this many steps the ranks all-gather the (token, expert) pairs they computed in graph-form
# steps (counted on the device there) for the load metrics; one small collective and one host sync on rank 0.
EXPERT_GRAPH_PAIRS_EVERY = 64

MAIN_GUARD_HINT = (
    "the engine's worker processes are spawned, and each one imports the __main__ script: create the LLM / "
    "engine under `if __name__ == \"__main__\":` in a script, or the workers start it again")


def model_eos_ids(tokenizer_path: str, cfg: ModelConfig) -> list[int]:
    ids: list[int] = []
    try:
        from server.tokenizer import Tokenizer

        ids = list(Tokenizer.from_pretrained(tokenizer_path).eos_token_ids)
    except (ValueError, OSError):
        pass  # a model without tokenizer files (dummy benchmarks) still has config.json's EOS
    return list(dict.fromkeys(ids + list(cfg.eos_token_ids)))


@dataclass
class InFlight:
    """A step whose sampled tokens are still on the device: ``seqs[i]``'s token is row i of ``batch``, held in
    their ``output_ids`` as the placeholder -(i + 1) until :meth:`Engine._resolve` reads it."""

    seqs: list[Sequence]
    batch: SampledBatch


class Engine:
    """Rank 0 of a ``sp_size x tp_size`` group. See ``add_request`` / ``step`` / ``abort_request``.

    Steps overlap (``config.overlap_schedule``): ``step()`` launches a step, then reads the previous step's tokens
    (the device is busy with the new one meanwhile), then samples the new step on the device and returns without
    waiting for its tokens; they are the next call's outputs. A decode row of the next step reads its input token
    from the device (:attr:`server.forward.plan.StepPlan.prev_tokens`). See docs/architecture.md, "Overlapped
    steps".
    """

    def __init__(self, config: EngineConfig, log_level: str = "WARNING"):
        config.validate()
        if getattr(multiprocessing.process.current_process(), "_inheriting", False):
            raise RuntimeError(f"an engine is being created while a worker process starts: {MAIN_GUARD_HINT}")
        self.config = config
        self.model_path = config.model_path or builtin_model_path()
        self.model_cfg = read_model_config(self.model_path)
        check_model_parallelism(self.model_path, self.model_cfg, config.tp_size, config.load_format,
                                config.ulysses_degree, config.ulysses_layers, config.quantization,
                                config.shard_dense_weights)
        self.tokenizer_path = config.tokenizer_path or self.model_path
        self.max_model_len = context_length(config, self.model_cfg)
        self.eos_token_ids = model_eos_ids(self.tokenizer_path, self.model_cfg)
        init_method = config.dist_init_addr or f"tcp://127.0.0.1:{free_port()}"
        ctx = mp.get_context("spawn")
        if config.node_rank != 0:
            raise ValueError("the engine (rank 0) runs on node 0; start other nodes with --node-rank k, which runs "
                             "only their worker ranks")
        self.procs = [  # this node's ranks; other nodes start their own (run_worker_node)
            ctx.Process(target=worker_main, args=(r, config, self.model_path, init_method, log_level), daemon=True)
            for r in range(1, config.local_world_size)
        ]
        for p in self.procs:
            p.start()
        try:
            self.pstate, self.runner = setup_rank(config, 0, self.model_path, init_method, self._check_workers)
        except BaseException:
            for p in self.procs:
                p.kill()
            raise
        self.device = self.pstate.device
        self.overlap = config.overlap_schedule
        if self.overlap is None:
            self.overlap = self.device.type == "cuda" or config.world_size == 1
        self.scheduler = Scheduler(config, self.runner.num_pages, self.runner.num_slots, self.max_model_len,
                                   self.runner.has_state,
                                   self.runner.snapshot_slots, self.runner.kv_window)
        self.cache = self.scheduler.cache
        self.seqs: dict[str, Sequence] = {}
        self.generators: dict[str, torch.Generator] = {}
        self.grammars = GrammarMasks(self.tokenizer_path, self.model_cfg.vocab_size, self.eos_token_ids,
                                     config.max_running_requests, self.device)
        self.pending: list[RequestOutput] = []
        self.inflight: InFlight | None = None
        self.rng = torch.Generator().manual_seed(config.seed)
        self.num_steps = 0
        self.profiler = RankProfiler(0, self.device)
        self.num_profiles = 0
        self.profile_started_at = 0
        self.profile_stop_at: int | None = None  # a profile started with num_steps stops by itself at this step
        self.stopped_profile: list[dict] | None = None  # its summaries, until stop_profile returns them
        self.num_prev_token_steps = 0  # steps whose decode rows read the previous step's tokens on the device
        self.last_step = StepCounts()
        self.closed = False

    def _check_workers(self) -> None:
        """Raise if a worker this process started has exited (called while rank 0 waits for them at start)."""
        for rank, p in enumerate(self.procs, start=1):
            if p.exitcode is not None:
                raise RuntimeError(f"worker rank {rank} exited with code {p.exitcode} during start-up (its log says "
                                   f"why); if this runs from a script, note that {MAIN_GUARD_HINT}")

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, req: GenerateRequest) -> None:
        try:
            req.sampling_params.check_vocab(self.model_cfg.vocab_size)
        except ValueError as e:
            raise RequestRejected(str(e), "invalid_token_id") from None
        bad = [t for t in req.prompt_token_ids if not (0 <= t < self.model_cfg.vocab_size)]
        if bad:
            raise RequestRejected(f"token id {bad[0]} is out of range [0, {self.model_cfg.vocab_size})",
                                  "invalid_token_id")
        structured = req.sampling_params.structured
        if structured is not None:
            try:
                self.grammars.add(req.rid, structured, req.sampling_params.stop_token_ids)
            except ValueError as e:
                raise RequestRejected(f"structured output: {e}", "invalid_structured_output") from None
        scored = req.sampling_params.prompt_logprobs is not None
        seq = Sequence(req.rid, list(req.prompt_token_ids), req.sampling_params, self.config.sp_size,
                       use_prefix_cache=not scored)  # prompt logprobs need every prompt position computed
        if scored:
            seq.prompt_logprobs = [None]  # the first prompt token follows nothing
        self.scheduler.add(seq)
        self.seqs[req.rid] = seq

    def abort_request(self, rid: str) -> None:
        seq = self.seqs.pop(rid, None)
        if seq is None:
            return
        if seq.token_in_flight:  # not delivered
            seq.output_ids.pop()
        self.scheduler.finish(seq)
        self.generators.pop(rid, None)
        self.grammars.drop(rid)
        self.pending.append(RequestOutput(rid, finished=True, finish_reason="abort",
                                          prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.output_ids)))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.pending) or self.inflight is not None

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs = self._step()
        if self.profile_stop_at is not None and self.num_steps >= self.profile_stop_at:
            self.stopped_profile = self.stop_profile()
            log.info("profile of %d steps written: %s", self.num_steps - self.profile_started_at,
                     ", ".join(r.get("trace") or r.get("error", "") for r in self.stopped_profile))
        return outputs

    def _step(self) -> list[RequestOutput]:
        PROFILE.start()
        outputs, self.pending = self.pending, []
        plan, seqs = self.scheduler.schedule()
        if not plan.chunks:
            return outputs + self._resolve()
        if plan.is_decode:
            PROFILE.mark("schedule")
        else:
            PROFILE.cancel()
        # expert parallel: every EXPERT_GRAPH_PAIRS_EVERY steps the ranks report their graph-form steps' pairs
        plan.collect_expert_pairs = bool(self.runner.moe_layers) and self.num_steps % EXPERT_GRAPH_PAIRS_EVERY == 0
        send_message(self.pstate, plan)
        PROFILE.mark("send")
        self.num_steps += 1
        self.num_prev_token_steps += plan.prev_tokens
        self.last_step = StepCounts(
            len(plan.chunks), sum(c.num_new for s, c in zip(seqs, plan.chunks) if s.prefilling),
            sum(c.num_new for s, c in zip(seqs, plan.chunks) if not s.prefilling),
            sum(c.placement == Placement.SPLIT for c in plan.chunks),
            sum(c.placement == Placement.HOMED for c in plan.chunks))
        out = self.runner.run(plan)
        if self.runner.moe_layers:
            self.last_step = replace(self.last_step, expert_pairs=self.runner.take_expert_pairs(),
                                     expert_graph_pairs=self.runner.graph_pairs if plan.collect_expert_pairs else ())
        self.scheduler.advance(seqs, plan)
        outputs += self._resolve()  # the previous step's tokens, while the device runs this one
        for i, scored in out.prompt_logprobs.items():
            self._add_prompt_logprobs(seqs[i], plan.chunks[i].start, scored)
        sampled = [(j, s) for j, s in enumerate(s for s, c in zip(seqs, plan.chunks) if c.sample)
                   if s.status == Status.RUNNING]  # a request the previous step's token ended is not sampled
        if not sampled:
            return outputs
        rows, live = zip(*sampled)
        logits = out.logits if len(rows) == out.logits.shape[0] else out.logits[list(rows)]
        outputs += self._sample(logits, list(live))
        PROFILE.mark("sample")
        if not self.overlap:
            outputs += self._resolve()
        PROFILE.mark("finish")
        PROFILE.end()
        return outputs

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[RequestOutput]:
        """Sample the batch on the device and leave its tokens in flight (see :class:`InFlight`). If that fails,
        request by request and at once, to find whose data caused it: the others get their token, that one an
        error."""
        try:
            batch = sample_async(logits, self._sample_requests(seqs), self.grammars.token_mask([s.rid for s in seqs]))
        except Exception as e:
            log.warning("batched sampling of %d requests failed (%s: %s); sampling them one by one", len(seqs),
                        type(e).__name__, e)
            return self._sample_one_by_one(logits, seqs)
        self.runner.last_tokens[: len(seqs)].copy_(batch.tokens, non_blocking=True)
        for i, seq in enumerate(seqs):
            seq.output_ids.append(-(i + 1))
        self.inflight = InFlight(seqs, batch)
        return []

    def _resolve(self) -> list[RequestOutput]:
        """The in-flight step's tokens: placeholders replaced, stop checks, outputs (waits for the device)."""
        if self.inflight is None:
            return []
        flight, self.inflight = self.inflight, None
        tokens, logprobs = flight.batch.result()
        PROFILE.mark("wait")
        outputs = []
        now = time.monotonic()
        for seq, tok, lp in zip(flight.seqs, tokens, logprobs):
            if seq.status != Status.RUNNING:  # aborted meanwhile
                continue
            seq.output_ids.pop()  # the placeholder (always the last: the next token is sampled after this)
            outputs.append(self._deliver(seq, tok, lp, now))
        return outputs

    def _deliver(self, seq: Sequence, token: int, logprob, now: float) -> RequestOutput:
        """``seq``'s new token through the stop checks; a failure there ends this request only."""
        try:
            return self._append_token(seq, token, logprob, now)
        except Exception as e:
            return self._fail_request(seq, "the stop checks", e)

    def _sample_requests(self, seqs: list[Sequence]) -> list[SampleRequest]:
        for s in seqs:
            inject_fault("sample", s.params.seed)
        return [SampleRequest(s.params, self._generator(s), self._banned(s), s.prompt_ids, s.output_ids)
                for s in seqs]

    def _sample_one_by_one(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[RequestOutput]:
        outputs = []
        now = time.monotonic()
        for i, seq in enumerate(seqs):
            try:
                [tok], [lp] = sample(logits[i : i + 1], self._sample_requests([seq]),
                                     self.grammars.token_mask([seq.rid]))
            except Exception as e:
                outputs.append(self._fail_request(seq, "sampling", e))
                continue
            outputs.append(self._deliver(seq, tok, lp, now))
        return outputs

    @staticmethod
    def _add_prompt_logprobs(seq: Sequence, start: int, scored: ScoredRows) -> None:
        """Append a prefill chunk's prompt logprobs: its rows from position ``start`` score tokens ``start + 1...``
        (trimmed to the request's own k: the step computed the largest k of its requests)."""
        k = seq.params.prompt_logprobs
        tokens = seq.prompt_ids[start + 1 : start + 1 + len(scored.logprobs)]
        seq.prompt_logprobs += [
            PromptTokenLogprob(t, lp, list(zip(ids[:k], vals[:k])), rank)
            for t, lp, rank, ids, vals in zip(tokens, scored.logprobs.tolist(), scored.ranks.tolist(),
                                              scored.top_ids.tolist(), scored.top_logprobs.tolist(), strict=True)]

    def _fail_request(self, seq: Sequence, stage: str, error: Exception) -> RequestOutput:
        """End one request whose own data made ``stage`` fail; its caches are freed, the engine goes on."""
        log.error("request %s failed in %s: %s: %s", seq.rid, stage, type(error).__name__, error)
        self.scheduler.finish(seq)
        self.seqs.pop(seq.rid, None)
        self.generators.pop(seq.rid, None)
        self.grammars.drop(seq.rid)
        return RequestOutput(seq.rid, finished=True, finish_reason="error",
                             error=f"{stage} failed: {type(error).__name__}: {error}",
                             prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.output_ids))

    def prompt_logits(self, prompt_ids: list[int]) -> torch.Tensor:
        """Logits ``[len(prompt), vocab]`` of every prompt position (prompt scoring), computed with the same
        chunking and SP placement as a normal prefill. Runs alone: call it with no other requests in flight."""
        if self.scheduler.has_unfinished():
            raise RuntimeError("prompt_logits runs alone; finish or abort the other requests first")
        seq = Sequence(f"score-{time.monotonic_ns()}", list(prompt_ids), SamplingParams(max_tokens=1),
                       self.config.sp_size, use_prefix_cache=False)
        self.scheduler.add(seq)
        parts = []
        try:
            while seq.prefilling:
                plan, seqs = self.scheduler.schedule()
                plan.all_logits = True
                send_message(self.pstate, plan)
                parts.append(self.runner.run(plan).logits)
                self.scheduler.advance(seqs, plan)
        finally:
            self.scheduler.finish(seq)
        return torch.cat(parts)

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.greedy:
            return None
        if seq.rid not in self.generators:
            seed = seq.params.generator_seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,), generator=self.rng))
            self.generators[seq.rid] = torch.Generator(device=self.device).manual_seed(seed)
        return self.generators[seq.rid]

    def _banned(self, seq: Sequence) -> list[int]:
        if len(seq.output_ids) >= seq.params.min_tokens or self.grammars.constrained(seq.rid):
            return []  # a grammar decides itself when its output may end
        return list(seq.params.stop_token_ids) + ([] if seq.params.ignore_eos else self.eos_token_ids)

    def _append_token(self, seq: Sequence, tok: int, lp, now: float) -> RequestOutput:
        ttft = None
        if seq.first_token_time is None:
            seq.first_token_time = now
            ttft = now - seq.arrival
        inject_fault("stop_check", seq.params.seed)
        seq.output_ids.append(tok)
        p = seq.params
        reason, matched = None, None
        if self.grammars.accept(seq.rid, tok):  # the grammar ended: its stop token was accepted
            reason, matched = "stop", tok
        elif (tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_token_ids)) \
                and len(seq.output_ids) >= p.min_tokens:
            reason, matched = "stop", tok
        elif len(seq.output_ids) >= seq.max_new_tokens:
            reason = "length"
        if reason:
            self.scheduler.finish(seq)
            self.seqs.pop(seq.rid, None)
            self.generators.pop(seq.rid, None)
            self.grammars.drop(seq.rid)
        prompt_logprobs, seq.prompt_logprobs = seq.prompt_logprobs, None  # sent once, with the first token
        return RequestOutput(seq.rid, [tok], [lp] if lp is not None else None, reason is not None, reason, matched,
                             prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.output_ids), ttft_s=ttft,
                             cached_tokens=seq.cached_tokens, prompt_logprobs=prompt_logprobs)

    # ---- status / lifetime ---------------------------------------------------------------------
    def stats(self) -> EngineStats:
        prefix = self.cache.prefix
        kv_total = self.cache.usable_pages * self.cache.sp_size if self.runner.has_kv else 0  # no KV layers
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_pages_used=self.cache.pages_used() if kv_total else 0,
            kv_pages_total=kv_total,
            state_slots_used=self.cache.num_slots - len(self.cache.free_slots),
            state_slots_total=self.cache.num_slots,
            kv_pages_cached=self.cache.pages_cached() if kv_total else 0,
            prefix_cache_entries=len(prefix.entries) if prefix else 0,
            prefix_cache_hit_tokens=prefix.hit_tokens if prefix else 0,
            num_steps=self.num_steps,
            last_step=self.last_step,
        )

    def flush_prefix_cache(self) -> int:
        """Drop every prefix-cache entry no running request uses; the number dropped."""
        return self.cache.flush()

    def memory_stats(self, reset: bool = True) -> list[dict]:
        """Every rank's device memory (peak allocated since the last reset, allocated now) and what holds it
        (weight, KV cache and state bytes, its experts; :meth:`ModelRunner.footprint`), by rank."""
        send_message(self.pstate, MemoryStatsRequest(reset))
        return gather_memory_stats(self.pstate, reset, self.runner)

    def start_profile(self, output_dir: str | None = None, record_shapes: bool = False,
                      num_steps: int | None = None) -> str:
        """Start ``torch.profiler`` on every rank from the next step on (``server/execution/profiler.py``); the
        directory (``output_dir``, default ``config.profile_dir``) where :meth:`stop_profile` writes the profiles.
        With ``num_steps`` the profile stops by itself after that many steps."""
        out = output_dir or self.config.profile_dir
        if not out:
            raise ValueError("profiling is off: start the server with --profile-dir DIR")
        if self.profiler.running:
            raise ValueError("a profile is running already: stop it first")
        if num_steps is not None and num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}")
        out = os.path.abspath(out)
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise ValueError(f"the profile directory {out} cannot be created: {e.strerror}") from None
        if not os.access(out, os.W_OK | os.X_OK):
            raise ValueError(f"the profile directory {out} is not writable")
        self.num_profiles += 1
        request = ProfileRequest(True, out, f"profile-{time.strftime('%Y%m%d-%H%M%S')}-{self.num_profiles}",
                                 record_shapes)
        send_message(self.pstate, request)
        self.profiler.start(request)
        self.stopped_profile = None
        self.profile_started_at = self.num_steps
        self.profile_stop_at = None if num_steps is None else self.num_steps + num_steps
        return out

    def stop_profile(self) -> list[dict]:
        """Stop every rank's profiler; each writes its trace and op table. Their summaries, by rank (paths,
        ``device_ms``, ``host_op_ms``, or ``error``). After a profile that stopped by itself (``num_steps``), its
        summaries, once."""
        if not self.profiler.running:
            if self.stopped_profile is not None:
                done, self.stopped_profile = self.stopped_profile, None
                return done
            raise ValueError("no profile is running: start one first")
        self.profile_stop_at = None
        request = ProfileRequest(False)
        send_message(self.pstate, request)
        return profile_rank(self.profiler, self.pstate, request)

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if all(p.is_alive() for p in self.procs):
                send_message(self.pstate, Shutdown())
                for p in self.procs:
                    p.join(timeout=10)
        finally:
            for p in self.procs:
                if p.is_alive():
                    p.kill()
            release_rank(self.runner, self.pstate)

    def __del__(self):
        try:
            self.shutdown()
        except Exception:
            pass
