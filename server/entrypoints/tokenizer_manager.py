"""The HTTP process's side of the engine.

``TokenizerManager`` starts the engine process (through :class:`server.entrypoints.supervisor.EngineSupervisor`,
which also watches it), tokenizes prompts, sends ``GenerateRequest`` / ``AbortRequest``
over zmq, detokenizes the engine's outputs incrementally (stop strings included: a matched stop string ends
the choice here and aborts it in the engine, which frees its caches) and hands each HTTP handler the events of
its choices. It also watches the engine process and every worker: a death, or a step that outlives the
watchdog timeout, fails every in-flight request at once and keeps ``healthy`` false for good.

Tokenization and chat-template rendering run on a small thread pool (``tokenizers`` releases the GIL), so a huge
prompt never stalls the event loop; and a text too long for the context whatever it tokenizes to is refused before
it is tokenized: no token covers more than ``Tokenizer.max_token_bytes`` bytes, so a text of B bytes has at least
B / max_token_bytes tokens (a 20 MB prompt to an 8K-token model gets its 400 in milliseconds). A fault while
handling one request's output (detokenization, a stop-string check) ends that request with an error; the other
requests and the server go on.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from server.engine.faults import inject_fault
from server.entrypoints.args import ServerArgs
from server.entrypoints.metrics import ServerMetrics
from server.entrypoints.protocol import APIError
from server.entrypoints.supervisor import EngineSupervisor
from server.messages import (
    AbortRequest,
    CacheFlushed,
    EngineCrashed,
    EngineOutputs,
    EngineReady,
    EngineStalled,
    EngineStartFailed,
    FlushCache,
    GenerateRequest,
    ProfileControl,
    ProfileReply,
    PromptTokenLogprob,
    Rejection,
    RequestOutput,
    TokenLogprob,
)
from server.sampling_params import SamplingParams
from server.tokenizer import IncrementalDetokenizer, Tokenizer, text_delta

logger = logging.getLogger(__name__)

REJECTION_STATUS = {"queue_full": 429, "internal_error": 500}  # every other engine rejection: the request, 400
TOKENIZER_THREADS = 4
FLUSH_TIMEOUT_S = 60.0
PROFILE_TIMEOUT_S = 600.0  # a stop waits for every rank to write its trace (large after many steps)


@dataclass
class ChoiceEvent:
    """What one engine output adds to choice ``index``: newly final text, new tokens and their logprobs (and, on
    the event of the first token, the prompt's logprobs when they were asked).

    A ``finish_reason`` ("stop" or "length") or an ``error`` ends the choice. ``completion_tokens`` counts
    every token generated so far; ``matched_stop`` is the stop string or stop token id that ended it.
    """

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    matched_stop: str | int | None = None
    error: APIError | None = None
    cached_tokens: int = 0  # prompt tokens the prefix cache served
    prompt_logprobs: list[PromptTokenLogprob | None] | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class Generation:
    """The choices of one HTTP request, in flight. Iterate for their events (in arrival order) until every
    choice is done; ``abort()`` cancels the unfinished ones (a client that went away)."""

    def __init__(self, manager: TokenizerManager, rids: list[str]):
        self.rids = rids
        self.queue: asyncio.Queue[ChoiceEvent] = asyncio.Queue()
        self._manager = manager
        self._open = set(range(len(rids)))

    async def __aiter__(self) -> AsyncIterator[ChoiceEvent]:
        while self._open:
            event = await self.queue.get()
            if event.done:
                self._open.discard(event.index)
            yield event

    def abort(self) -> None:
        self._manager.abort([self.rids[i] for i in sorted(self._open)])
        self._open.clear()


@dataclass
class _Choice:
    rid: str
    index: int
    generation: Generation
    detokenizer: IncrementalDetokenizer
    prompt_tokens: int
    arrival: float
    seed: int | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0


SHUTTING_DOWN = APIError(503, "The server is shutting down.", type="server_error", code="shutting_down")


class TokenizerManager:
    """See the module docstring. ``start()`` returns at once; ``healthy`` turns true once every rank is ready."""

    def __init__(self, args: ServerArgs, metrics: ServerMetrics):
        self.args = args
        self.metrics = metrics
        self.tokenizer: Tokenizer | None = None
        self.max_model_len = 0
        self.vocab_size = 0
        self.dead_reason: str | None = None
        self.draining = False  # shutting down: new requests get 503, in-flight ones finish within the grace period
        self._ready = False
        self._choices: dict[str, _Choice] = {}
        self.engine = EngineSupervisor(args)
        self._on_fatal: Callable[[str], None] = lambda message: None
        self._flushes: list[asyncio.Future] = []  # /flush_cache calls waiting for the engine, in order
        self._profiles: list[asyncio.Future] = []  # /start_profile and /stop_profile calls, in order
        self._pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="tokenize")
        for _ in range(TOKENIZER_THREADS):  # start the threads now: starting one waits for the GIL
            self._pool.submit(time.sleep, 0.01)

    @property
    def healthy(self) -> bool:
        return self._ready and self.dead_reason is None and not self.draining

    @property
    def num_in_flight(self) -> int:
        return len(self._choices)

    # ---- lifetime --------------------------------------------------------------------------------------------
    async def start(self, on_fatal: Callable[[str], None]) -> None:
        """Start the engine process; ``on_fatal(message)`` is called if it fails before it is ready."""
        self._on_fatal = on_fatal
        await self.engine.start(self._on_message, self._on_death)

    async def shutdown(self) -> None:
        """Fail what is in flight, stop the engine process and every worker."""
        self._fail_all(SHUTTING_DOWN)
        self._ready = False
        await self.engine.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def fail_in_flight(self, error: APIError) -> None:
        """End every in-flight request with ``error`` (shutdown after the grace period)."""
        for rid in list(self._choices):
            self._send(AbortRequest(rid))
        self._fail_all(error)

    # ---- requests --------------------------------------------------------------------------------------------
    async def _in_pool(self, fn: Callable, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def check_text_fits(self, text: str, param: str) -> None:
        """400 ``context_length_exceeded`` for a text that cannot leave room for one completion token in the
        context, whatever it tokenizes to (see the module docstring); cheap, so it runs before tokenizing."""
        n_bytes = len(text.encode("utf-8", "surrogatepass"))
        at_least = -(-n_bytes // self.tokenizer.max_token_bytes)
        if at_least >= self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, the "
                           f"{param} is {n_bytes} bytes long, which is at least {at_least} tokens (no token of this "
                           f"model covers more than {self.tokenizer.max_token_bytes} bytes). Please reduce the length "
                           f"of the {param}.", param=param, code="context_length_exceeded")

    async def encode(self, prompt: str | list[int], add_special_tokens: bool = True, param: str = "prompt"
                     ) -> list[int]:
        if isinstance(prompt, list):
            return list(prompt)
        self.check_text_fits(prompt, param)
        return await self._in_pool(self.tokenizer.encode, prompt, add_special_tokens)

    async def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return await self._in_pool(self.tokenizer.decode, ids, skip_special_tokens)

    async def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                          continue_final_message: bool = False, param: str = "messages", **variables) -> list[int]:
        """The rendered chat template's ids; ``variables`` reach the template (``tools``, ``enable_thinking``)."""
        try:
            # rendered first (a string join, fast) so that an over-long conversation is refused before tokenizing
            text = await self._in_pool(self.tokenizer.apply_chat_template, messages, add_generation_prompt,
                                       continue_final_message=continue_final_message)
            self.check_text_fits(text, param)
            return await self._in_pool(self.tokenizer.encode_chat, messages, add_generation_prompt,
                                       continue_final_message=continue_final_message,
                                       control_tokens_in_content=self.args.allow_control_tokens_in_chat, **variables)
        except APIError:
            raise
        except Exception as e:  # a template's raise_exception, a missing template, a forged control token
            raise APIError(400, f"The chat template could not format the messages: {e}", param=param) from None

    @functools.lru_cache(maxsize=65536)  # noqa: B019 -- one manager per process, lives as long as it
    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    @functools.lru_cache(maxsize=65536)  # noqa: B019 -- as above
    def token_bytes(self, token_id: int) -> bytes:
        return self.tokenizer.token_bytes(token_id)

    def default_max_tokens(self, prompt_len: int, fallback: int | None = None) -> int | None:
        """The completion length of a request that leaves it out (or null): ``--default-max-tokens``, else
        ``fallback``, at most what the context leaves after ``prompt_len`` tokens; None: the rest of the context."""
        n = self.args.default_max_tokens or fallback
        return None if n is None else max(min(n, self.max_model_len - prompt_len), 1)

    def check_available(self) -> None:
        """503 while the engine is loading, after it died, and while the server shuts down."""
        if self.draining:
            raise SHUTTING_DOWN
        if self.dead_reason is not None:
            raise APIError(503, f"The engine is not running ({self.dead_reason}).", type="server_error",
                           code="engine_dead")
        if not self._ready:
            raise APIError(503, "The model is still loading; retry shortly.", type="server_error",
                           code="engine_loading", headers={"Retry-After": "5"})

    def submit(self, prompts: list[list[int]], params: list[SamplingParams], arrival: float) -> Generation:
        """Send one request per choice (``prompts[i]`` with ``params[i]``). 400 when the request alone can never
        fit the server's queue, 429 when it is full now."""
        self.check_available()
        limit = self.args.engine.max_running_requests + self.args.engine.max_waiting_requests
        if len(params) > limit:
            raise APIError(400, f"The request asks for {len(params)} completions (prompts x n); this server holds at "
                           f"most {limit} at once (--max-running-requests + --max-waiting-requests). Split it.",
                           param="n", code="too_many_completions")
        if len(self._choices) + len(params) > limit:
            raise APIError(429, f"The server is busy ({len(self._choices)} requests in flight, at most {limit}); "
                           "retry later.", type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        rids = [uuid.uuid4().hex for _ in params]
        gen = Generation(self, rids)
        for i, (rid, ids, sp) in enumerate(zip(rids, prompts, params, strict=True)):
            detok = IncrementalDetokenizer(self.tokenizer, sp.stop, sp.skip_special_tokens)
            self._choices[rid] = _Choice(rid, i, gen, detok, len(ids), arrival, sp.seed)
            self._send(GenerateRequest(rid, ids, sp))
        self.metrics.in_flight.set(len(self._choices))
        return gen

    def abort(self, rids: list[str]) -> None:
        for rid in rids:
            choice = self._choices.pop(rid, None)
            if choice is not None:
                self.metrics.requests.labels(finish_reason="abort").inc()
                self._log_finish(choice, "abort")
                self._send(AbortRequest(rid))
        self.metrics.in_flight.set(len(self._choices))

    async def flush_cache(self) -> int:
        """Drop the prefix cache's unused entries; how many were dropped."""
        self.check_available()
        future = asyncio.get_running_loop().create_future()
        self._flushes.append(future)
        self._send(FlushCache())
        return await asyncio.wait_for(future, FLUSH_TIMEOUT_S)

    async def control_profile(self, start: bool, record_shapes: bool = False,
                              num_steps: int | None = None) -> ProfileReply:
        """Start or stop the profiler on every rank (see ``server/execution/profiler.py``); the engine's reply."""
        self.check_available()
        future = asyncio.get_running_loop().create_future()
        self._profiles.append(future)
        self._send(ProfileControl(start, record_shapes, num_steps))
        return await asyncio.wait_for(future, PROFILE_TIMEOUT_S)

    def _send(self, msg: GenerateRequest | AbortRequest | FlushCache | ProfileControl) -> None:
        if self.dead_reason is None and not self.engine.send(msg):  # no engine connected: the watcher will notice
            self._on_death("the engine process stopped accepting requests")

    # ---- engine messages -------------------------------------------------------------------------------------
    async def _on_message(self, msg: object) -> None:
        if isinstance(msg, EngineOutputs):
            self._on_outputs(msg)
        elif isinstance(msg, CacheFlushed):
            if self._flushes:
                future = self._flushes.pop(0)
                if not future.done():
                    future.set_result(msg.entries)
        elif isinstance(msg, ProfileReply):
            if self._profiles:
                future = self._profiles.pop(0)
                if not future.done():
                    future.set_result(msg)
        elif isinstance(msg, EngineReady):
            await self._on_ready(msg)
        elif isinstance(msg, EngineStartFailed):
            logger.debug("engine start-up failed:\n%s", msg.traceback)
            self._on_death(f"the engine failed to start: {msg.message}")
        elif isinstance(msg, EngineStalled):
            self._on_death(msg.message)
            await asyncio.to_thread(self.engine.kill_tree)
        elif isinstance(msg, EngineCrashed):
            logger.error("engine crashed:\n%s", msg.traceback)
            # A dead worker makes rank 0's next collective fail: name the cause, not the symptom.
            self._on_death(self.engine.dead_process() or f"engine crashed: {msg.message.splitlines()[0][:300]}")

    async def _on_ready(self, msg: EngineReady) -> None:
        path = self.args.engine.tokenizer_path or msg.tokenizer_path
        try:
            self.tokenizer = await asyncio.to_thread(Tokenizer.from_pretrained, path, self.args.chat_template)
            await asyncio.to_thread(lambda: self.tokenizer.max_token_bytes)  # one pass over the vocabulary, now
        except Exception as e:
            self._on_death(f"could not load the tokenizer from {path!r}: {e}")
            return
        self.max_model_len = msg.max_model_len
        self.vocab_size = self.tokenizer.vocab_size
        self.engine.worker_pids = msg.worker_pids
        self._ready = self.engine.ready = True
        self.metrics.set_rank_memory(msg.rank_memory)
        self.metrics.healthy.set(1)
        logger.info("engine ready: %d rank(s), max_model_len %d; serving %r", 1 + len(msg.worker_pids),
                    msg.max_model_len, self.args.served_model_name)

    def _on_outputs(self, msg: EngineOutputs) -> None:
        now = time.monotonic()
        for out in msg.outputs:
            choice = self._choices.get(out.rid)
            if choice is None:
                continue
            try:
                self._on_output(choice, out, now)
            except Exception as e:  # this request's fault (detokenization, stop strings): end it alone
                logger.exception("request %s failed while handling its output", out.rid)
                if self._choices.pop(out.rid, None) is not None:
                    self._send(AbortRequest(out.rid))
                    error = APIError(500, f"The request failed while its output was processed: {type(e).__name__}: "
                                     f"{e}", type="server_error", code="internal_error")
                    self._finish(choice, ChoiceEvent(choice.index, "", [], None, choice.prompt_tokens,
                                                     choice.completion_tokens, error=error), "error")
        for rej in msg.rejected:
            choice = self._choices.pop(rej.rid, None)
            if choice is not None:
                self._finish(choice, self._rejection_event(choice, rej), "rejected")
        self.metrics.set_engine_stats(msg.stats)
        self.metrics.in_flight.set(len(self._choices))

    def _on_output(self, choice: _Choice, out: RequestOutput, now: float) -> None:
        n_new = len(out.new_token_ids)
        if n_new:
            if choice.last_token_time is None:
                choice.first_token_time = now
                self.metrics.ttft.observe(now - choice.arrival)
            else:
                for _ in range(n_new):
                    self.metrics.itl.observe((now - choice.last_token_time) / n_new)
            choice.last_token_time = now
            choice.completion_tokens += n_new
            self.metrics.generation_tokens.inc(n_new)
        detok = choice.detokenizer
        inject_fault("detokenize", choice.seed)
        choice.cached_tokens = max(choice.cached_tokens, out.cached_tokens)
        delta = text_delta(detok, out.new_token_ids, out.finished, out.finish_reason, out.matched_stop)
        event = ChoiceEvent(choice.index, delta.text, list(out.new_token_ids), out.new_logprobs,
                            choice.prompt_tokens, choice.completion_tokens, cached_tokens=choice.cached_tokens,
                            prompt_logprobs=out.prompt_logprobs)
        if delta.finish_reason:
            event.finish_reason, event.matched_stop = delta.finish_reason, delta.matched_stop
            if delta.abort:
                self._send(AbortRequest(choice.rid))  # free its caches now; its abort output is ignored
        elif out.finished:
            event.error = APIError(500, f"The engine ended the request: {out.error or out.finish_reason}.",
                                   type="server_error", code=out.finish_reason)
        if event.done:
            del self._choices[choice.rid]
            self._finish(choice, event, event.finish_reason or "error")
        else:
            choice.generation.queue.put_nowait(event)

    def _rejection_event(self, choice: _Choice, rej: Rejection) -> ChoiceEvent:
        status = REJECTION_STATUS.get(rej.code, 400)
        error = APIError(status, rej.message[:1].upper() + rej.message[1:], code=rej.code,
                         type="rate_limit_error" if status == 429 else "invalid_request_error",
                         headers={"Retry-After": "1"} if status == 429 else None)
        return ChoiceEvent(choice.index, "", [], None, choice.prompt_tokens, 0, error=error)

    def _finish(self, choice: _Choice, event: ChoiceEvent, reason: str) -> None:
        e2e = time.monotonic() - choice.arrival if event.error is None else None
        self.metrics.on_finish(reason, choice.prompt_tokens, e2e, choice.cached_tokens)
        event.cached_tokens = choice.cached_tokens
        self._log_finish(choice, reason if event.error is None else f"{reason} ({event.error.code})")
        choice.generation.queue.put_nowait(event)

    @staticmethod
    def _log_finish(choice: _Choice, reason: str) -> None:
        now = time.monotonic()
        ttft = "-" if choice.first_token_time is None else f"{choice.first_token_time - choice.arrival:.3f}s"
        logger.info("request %s finished: %s; prompt %d tokens, completion %d tokens; ttft %s, latency %.3fs",
                    choice.rid, reason, choice.prompt_tokens, choice.completion_tokens, ttft, now - choice.arrival)

    # ---- failures --------------------------------------------------------------------------------------------
    def _on_death(self, reason: str) -> None:
        """The engine is gone for good. Before it was ready the server cannot serve at all and exits; after,
        it fails what is in flight and keeps answering /health with 503."""
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        self.engine.report_death(reason)  # once: the watcher stops
        if not self._ready:
            self._on_fatal(reason)
            return
        self.metrics.healthy.set(0)
        logger.error("%s; failing %d in-flight request(s); /health now fails", reason, len(self._choices))
        error = APIError(500, f"The engine failed: {reason}.", type="server_error", code="engine_dead")
        self._fail_all(error)
        for future in self._flushes + self._profiles:  # control calls waiting for the engine's answer
            if not future.done():
                future.set_exception(error)
        self._flushes.clear()
        self._profiles.clear()

    def _fail_all(self, error: APIError) -> None:
        choices, self._choices = self._choices, {}
        for choice in choices.values():
            event = ChoiceEvent(choice.index, "", [], None, choice.prompt_tokens, choice.completion_tokens,
                                error=error)
            self._finish(choice, event, "error")
        self.metrics.in_flight.set(0)
