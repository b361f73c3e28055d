"""The generation endpoints: OpenAI ``/v1/completions`` and ``/v1/chat/completions``, and the native
``/generate``. Each turns a request body into choices for the ``TokenizerManager`` and its events into one JSON
response or a server-sent-event stream framed as OpenAI frames it (``data: {json}\\n\\n`` ... ``data: [DONE]``).

A client that goes away aborts its request: while waiting for a non-streaming result, while waiting for the
first token of a stream, and while streaming.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.engine.io_struct import TokenLogprob
from server.entrypoints.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequestBody,
    bad_request,
    chat_logprobs,
    chat_messages,
    check_context_length,
    check_model,
    check_stream_options,
    choice_count,
    completion_logprobs,
    native_sampling_params,
    normalize_prompt,
    parse_body,
    sampling_params_for,
)
from server.entrypoints.tokenizer_manager import ChoiceEvent, Generation, TokenizerManager

MIN_LOGPROB = -9999.0  # JSON has no -inf; OpenAI reports impossible tokens this way
CLIENT_CLOSED_REQUEST = 499


class ClientDisconnected(Exception):
    pass


@dataclass
class ChoiceResult:
    """A whole choice, accumulated from its events."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    matched_stop: str | int | None = None
    completion_tokens: int = 0

    def add(self, ev: ChoiceEvent) -> None:
        self.text += ev.text
        self.token_ids += ev.token_ids
        self.logprobs += ev.logprobs or []
        self.completion_tokens = ev.completion_tokens
        if ev.finish_reason is not None:
            self.finish_reason, self.matched_stop = ev.finish_reason, ev.matched_stop


def sse(obj: dict | str) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _SSEResponse(StreamingResponse):
    """A stream whose body generator is always closed when the response ends, so that its ``finally`` (which
    aborts the request) runs at once even when the client disconnected while the generator was suspended."""

    def __init__(self, body: AsyncIterator[str]):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, gen: Generation, awaitable):
    """Await ``awaitable``; if the client goes away first, abort ``gen`` and raise ClientDisconnected."""
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
            gen.abort()
    if not work.done():
        raise ClientDisconnected
    return work.result()


async def _collect(gen: Generation) -> list[ChoiceResult]:
    results = [ChoiceResult() for _ in gen.rids]
    async for ev in gen:
        if ev.error is not None:
            gen.abort()
            raise ev.error
        results[ev.index].add(ev)
    return results


class OpenAIServing:
    """Request handlers shared by the routes; ``tm`` does the engine work."""

    def __init__(self, tm: TokenizerManager, served_model_name: str):
        self.tm = tm
        self.model = served_model_name

    # ---- /v1/completions -------------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        arrival = time.monotonic()
        req = parse_body(await request.body(), CompletionRequest)
        self.tm.check_available()
        check_model(req.model, self.model)
        check_stream_options(req)
        n = choice_count(req.n)
        logprobs = completion_logprobs(req)
        prompts = normalize_prompt(req.prompt, self.tm.vocab_size)
        prompt_ids = [await self.tm.encode(p) for p in prompts]
        ids, params, echo = [], [], []
        for p, p_ids in zip(prompts, prompt_ids, strict=True):
            params += sampling_params_for(req, max_tokens=req.max_tokens, logprobs=logprobs, prompt_len=len(p_ids),
                                          max_model_len=self.tm.max_model_len, n=n, vocab_size=self.tm.vocab_size)
            ids += [p_ids] * n
            text = "" if not req.echo else p if isinstance(p, str) else await self.tm.decode(p)
            echo += [text] * n
        prompt_tokens = sum(len(p) for p in prompt_ids)
        gen = self.tm.submit(ids, params, arrival)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await self._stream(request, gen, lambda events: self._completion_chunks(
                events, head, echo, logprobs is not None, prompt_tokens, include_usage))
        try:
            results = await _unless_disconnected(request, gen, _collect(gen))
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        choices = [
            {"index": i, "text": echo[i] + r.text,
             "logprobs": self._completion_logprobs(r.logprobs, len(echo[i])) if logprobs is not None else None,
             "finish_reason": r.finish_reason}
            for i, r in enumerate(results)
        ]
        completion_tokens = sum(r.completion_tokens for r in results)
        return JSONResponse({**head, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)})

    async def _completion_chunks(self, events: AsyncIterator[ChoiceEvent], head: dict, echo: list[str],
                                 with_logprobs: bool, prompt_tokens: int, include_usage: bool):
        extra = {"usage": None} if include_usage else {}
        offsets = [len(e) for e in echo]
        completion_tokens = [0] * len(echo)
        for i, text in enumerate(echo):
            if text:
                yield {**head, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": None}],
                       **extra}
        async for ev in events:
            completion_tokens[ev.index] = ev.completion_tokens
            if ev.text or ev.logprobs:
                lp = self._completion_logprobs(ev.logprobs or [], offsets[ev.index]) if with_logprobs else None
                offsets[ev.index] += len(ev.text)
                yield {**head, "choices": [{"index": ev.index, "text": ev.text, "logprobs": lp,
                                            "finish_reason": None}], **extra}
            if ev.finish_reason is not None:
                yield {**head, "choices": [{"index": ev.index, "text": "", "logprobs": None,
                                            "finish_reason": ev.finish_reason}], **extra}
        if include_usage:
            yield {**head, "choices": [], "usage": usage(prompt_tokens, sum(completion_tokens))}

    def _completion_logprobs(self, lps: list[TokenLogprob], offset: int) -> dict:
        tokens = [self.tm.token_text(lp.token_id) for lp in lps]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [max(lp.logprob, MIN_LOGPROB) for lp in lps],
            "top_logprobs": [{self.tm.token_text(t): max(v, MIN_LOGPROB) for t, v in lp.top} for lp in lps],
            "text_offset": offsets,
        }

    # ---- /v1/chat/completions --------------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        arrival = time.monotonic()
        req = parse_body(await request.body(), ChatCompletionRequest)
        self.tm.check_available()
        check_model(req.model, self.model)
        check_stream_options(req)
        n = choice_count(req.n)
        logprobs = chat_logprobs(req)
        prompt_ids = await self.tm.encode_chat(chat_messages(req))
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = sampling_params_for(req, max_tokens=max_tokens, logprobs=logprobs, prompt_len=len(prompt_ids),
                                     max_model_len=self.tm.max_model_len, n=n, vocab_size=self.tm.vocab_size)
        gen = self.tm.submit([prompt_ids] * n, params, arrival)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            chunk_head = {**head, "object": "chat.completion.chunk"}
            return await self._stream(request, gen, lambda events: self._chat_chunks(
                events, chunk_head, n, logprobs is not None, len(prompt_ids), include_usage))
        try:
            results = await _unless_disconnected(request, gen, _collect(gen))
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        choices = [
            {"index": i, "message": {"role": "assistant", "content": r.text},
             "logprobs": self._chat_logprobs(r.logprobs) if logprobs is not None else None,
             "finish_reason": r.finish_reason}
            for i, r in enumerate(results)
        ]
        completion_tokens = sum(r.completion_tokens for r in results)
        return JSONResponse({**head, "choices": choices, "usage": usage(len(prompt_ids), completion_tokens)})

    async def _chat_chunks(self, events: AsyncIterator[ChoiceEvent], head: dict, n: int, with_logprobs: bool,
                           prompt_tokens: int, include_usage: bool):
        extra = {"usage": None} if include_usage else {}

        def chunk(index: int, delta: dict, logprobs=None, finish_reason=None) -> dict:
            return {**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish_reason}], **extra}

        completion_tokens = [0] * n
        for i in range(n):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for ev in events:
            completion_tokens[ev.index] = ev.completion_tokens
            if ev.text or ev.logprobs:
                lp = self._chat_logprobs(ev.logprobs or []) if with_logprobs else None
                yield chunk(ev.index, {"content": ev.text}, lp)
            if ev.finish_reason is not None:
                yield chunk(ev.index, {}, finish_reason=ev.finish_reason)
        if include_usage:
            yield {**head, "choices": [], "usage": usage(prompt_tokens, sum(completion_tokens))}

    def _chat_logprobs(self, lps: list[TokenLogprob]) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            text = self.tm.token_text(token_id)
            return {"token": text, "logprob": max(logprob, MIN_LOGPROB), "bytes": list(text.encode())}

        content = [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps]
        return {"content": content, "refusal": None}

    # ---- /generate -------------------------------------------------------------------------------------------
    async def generate(self, request: Request) -> Response:
        """Native API: ``{"text" | "input_ids", "sampling_params": {...}, "stream"}``."""
        arrival = time.monotonic()
        req = parse_body(await request.body(), GenerateRequestBody)
        self.tm.check_available()
        if (req.text is None) == (req.input_ids is None):
            raise bad_request("Give exactly one of 'text' and 'input_ids'.", param="text")
        prompt = normalize_prompt(req.text if req.text is not None else req.input_ids, self.tm.vocab_size)[0]
        prompt_ids = await self.tm.encode(prompt)
        params = native_sampling_params(req.sampling_params, self.tm.vocab_size)
        check_context_length(len(prompt_ids), params.max_tokens, self.tm.max_model_len, "text")
        gen = self.tm.submit([prompt_ids], [params], arrival)
        rid = gen.rids[0]
        if req.stream:
            return await self._stream(request, gen, lambda events: self._generate_chunks(events, rid, arrival))
        try:
            [r] = await _unless_disconnected(request, gen, _collect(gen))
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        body = {"text": r.text, "output_ids": r.token_ids,
                "meta_info": self._meta_info(rid, len(prompt_ids), r.completion_tokens, r.finish_reason,
                                             r.matched_stop, arrival)}
        if params.logprobs is not None:
            body["output_logprobs"] = self._native_logprobs(r.logprobs)
        return JSONResponse(body)

    async def _generate_chunks(self, events: AsyncIterator[ChoiceEvent], rid: str, arrival: float):
        async for ev in events:
            chunk = {"text": ev.text, "output_ids": ev.token_ids,
                     "meta_info": self._meta_info(rid, ev.prompt_tokens, ev.completion_tokens, ev.finish_reason,
                                                  ev.matched_stop, arrival)}
            if ev.logprobs is not None:
                chunk["output_logprobs"] = self._native_logprobs(ev.logprobs)
            yield chunk

    @staticmethod
    def _meta_info(rid: str, prompt_tokens: int, completion_tokens: int, finish_reason: str | None,
                   matched_stop: str | int | None, arrival: float) -> dict:
        return {"id": rid, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "finish_reason": finish_reason, "matched_stop": matched_stop,
                "e2e_latency": time.monotonic() - arrival}

    @staticmethod
    def _native_logprobs(lps: list[TokenLogprob]) -> list[dict]:
        return [{"token_id": lp.token_id, "logprob": max(lp.logprob, MIN_LOGPROB),
                 "top": [[t, max(v, MIN_LOGPROB)] for t, v in lp.top]} for lp in lps]

    # ---- streaming -------------------------------------------------------------------------------------------
    async def _stream(self, request: Request, gen: Generation,
                      chunks: Callable[[AsyncIterator[ChoiceEvent]], AsyncIterator[dict]]) -> Response:
        """Answer with SSE once the first event is in, so that a request the engine rejects still gets a plain
        HTTP error; an error after that is sent as an ``{"error": ...}`` event before ``[DONE]``."""
        events = aiter(gen)
        try:
            first = await _unless_disconnected(request, gen, anext(events))
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        if first.error is not None:
            gen.abort()
            raise first.error

        async def checked() -> AsyncIterator[ChoiceEvent]:
            event = first
            while True:
                if event.error is not None:
                    raise event.error
                yield event
                try:
                    event = await anext(events)
                except StopAsyncIteration:
                    return

        async def body() -> AsyncIterator[str]:
            try:
                async for obj in chunks(checked()):
                    yield sse(obj)
            except APIError as e:
                yield sse(e.body())
            finally:
                gen.abort()
            yield sse("[DONE]")

        return _SSEResponse(body())
