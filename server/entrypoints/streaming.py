"""What every generation endpoint shares: waiting for a request's choices while watching for a client that goes
away, and answering with server-sent events.

A client that goes away aborts its request: while waiting for a non-streaming result, while waiting for the
first token of a stream, and while streaming.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from server.entrypoints.protocol import APIError
from server.entrypoints.tokenizer_manager import ChoiceEvent, Generation
from server.messages import PromptTokenLogprob, TokenLogprob

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
    cached_tokens: int = 0
    prompt_logprobs: list[PromptTokenLogprob | None] | None = None

    def add(self, ev: ChoiceEvent) -> None:
        self.text += ev.text
        self.token_ids += ev.token_ids
        self.logprobs += ev.logprobs or []
        self.completion_tokens = ev.completion_tokens
        self.cached_tokens = max(self.cached_tokens, ev.cached_tokens)
        if ev.prompt_logprobs is not None:
            self.prompt_logprobs = ev.prompt_logprobs
        if ev.finish_reason is not None:
            self.finish_reason, self.matched_stop = ev.finish_reason, ev.matched_stop


def sse(obj: dict | str, event: str | None = None) -> str:
    """One server-sent event: ``data: {json}\\n\\n``, after an ``event: NAME`` line if ``event`` is given."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event}\ndata: {data}\n\n" if event else f"data: {data}\n\n"


def clamp_logprob(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


class SSEResponse(StreamingResponse):
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


async def unless_disconnected(request: Request, gen: Generation, awaitable):
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


async def collect(request: Request, gen: Generation) -> list[ChoiceResult] | None:
    """Every choice of ``gen``, whole; None if the client went away first (``gen`` is aborted then)."""
    try:
        return await unless_disconnected(request, gen, _collect(gen))
    except ClientDisconnected:
        return None


async def stream(request: Request, gen: Generation, chunks: Callable[[AsyncIterator[ChoiceEvent]], AsyncIterator],
                 error_event: Callable[[APIError], str] = lambda e: sse(e.body()),
                 done: str | None = sse("[DONE]")) -> Response:
    """Answer with SSE once the first event is in, so that a request the engine rejects still gets a plain HTTP
    error. ``chunks`` turns the events into SSE strings or dicts (sent as ``data:`` events); an error after the
    first event is sent as ``error_event(e)``; then ``done`` (OpenAI's ``data: [DONE]``) ends the stream."""
    events = aiter(gen)
    try:
        first = await unless_disconnected(request, gen, anext(events))
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
                yield obj if isinstance(obj, str) else sse(obj)
        except APIError as e:
            yield error_event(e)
        finally:
            gen.abort()
        if done:
            yield done

    return SSEResponse(body())
