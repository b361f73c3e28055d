"""OpenAI's Responses API, ``POST /v1/responses``, for text: ``input`` (a string or a list of messages with text
content), ``instructions`` (a system message placed first), ``max_output_tokens``, ``temperature``, ``top_p``,
``stream``. The prompt is the chat template's rendering of the messages, as for chat completions.

Nothing is stored: ``store`` must be false (or left out) and ``previous_response_id`` is refused; tools,
reasoning and the other output-changing fields are refused unless neutral. ``text.format`` (``json_schema``,
``json_object``) constrains the output (server/entrypoints/structured.py). A stream
sends OpenAI's typed events (``event: response.created`` ... ``response.output_text.delta`` ...
``response.completed``, or ``response.incomplete`` when ``max_output_tokens`` ended it), each with its
``sequence_number``; there is no ``[DONE]``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, ClassVar, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from server.entrypoints.protocol import (
    IGNORED_FIELDS,
    APIError,
    ChatMessage,
    RequestBody,
    chat_messages,
    check_context_length,
    check_model,
    make_sampling_params,
    parse_body_off_loop,
    structured_output,
)
from server.entrypoints.streaming import CLIENT_CLOSED_REQUEST, ChoiceResult, collect, sse, stream
from server.entrypoints.structured import TextOptions, text_format_structured_output
from server.entrypoints.tokenizer_manager import ChoiceEvent, TokenizerManager
from server.sampling_params import MaxTokens, Temperature, TopP


class ContentPart(BaseModel):
    """Text of an input message (``input_text``), or of an earlier answer sent back (``output_text``)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None  # of earlier output: no effect
    logprobs: list[Any] | None = None  # of earlier output: no effect


class InputMessage(BaseModel):
    """One input item of a Responses API request."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    id: str | None = None  # of earlier output: no effect
    status: str | None = None  # of earlier output: no effect


class ResponsesRequest(RequestBody):
    """The body of ``POST /v1/responses``."""

    ignored_fields: ClassVar[frozenset[str]] = IGNORED_FIELDS - {"store"}
    neutral_only_fields: ClassVar[dict[str, Any]] = {
        "store": False, "previous_response_id": None, "conversation": None, "background": False, "tools": [],
        "tool_choice": "auto", "parallel_tool_calls": True, "max_tool_calls": None, "reasoning": None,
        "truncation": "disabled", "include": [], "top_logprobs": None,
        "prompt": None, "stream_options": None,
    }
    model: str | None = None
    input: str | Annotated[list[InputMessage], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stream: bool = False
    text: TextOptions | None = None


def _messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    items = [InputMessage(role="user", content=req.input)] if isinstance(req.input, str) else req.input
    if req.instructions is not None:
        items = [InputMessage(role="system", content=req.instructions), *items]
    messages = [ChatMessage(role=m.role, content=m.content if isinstance(m.content, str)
                            else "\n".join(p.text for p in m.content)) for m in items]
    return chat_messages(messages)


class ResponsesServing:
    """``POST /v1/responses``; ``tm`` does the engine work."""

    def __init__(self, tm: TokenizerManager, served_model_name: str):
        self.tm = tm
        self.model = served_model_name

    async def create(self, request: Request) -> Response:
        arrival = time.monotonic()
        req = await parse_body_off_loop(await request.body(), ResponsesRequest)
        self.tm.check_available()
        check_model(req.model, self.model)
        prompt_ids = await self.tm.encode_chat(_messages(req), param="input")
        max_tokens = req.max_output_tokens
        if max_tokens is None:
            max_tokens = self.tm.default_max_tokens(len(prompt_ids)) or max(self.tm.max_model_len - len(prompt_ids), 1)
        check_context_length(len(prompt_ids), max_tokens, self.tm.max_model_len, "input")
        params = make_sampling_params({"max_tokens": "max_output_tokens"}, max_tokens=max_tokens,
                                      temperature=req.temperature, top_p=req.top_p,
                                      structured=structured_output(text_format_structured_output, req.text))
        gen = self.tm.submit([prompt_ids], [params], arrival)
        shape = _Shape(req, self.model, len(prompt_ids))
        if req.stream:
            return await stream(request, gen, shape.events, shape.error_event, done=None)
        results = await collect(request, gen)
        if results is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(shape.response(results[0]))


class _Shape:
    """The Response object and the stream's events of one request."""

    def __init__(self, req: ResponsesRequest, model: str, input_tokens: int):
        self.req, self.model, self.input_tokens = req, model, input_tokens
        self.id = f"resp_{uuid.uuid4().hex}"
        self.msg_id = f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.seq = 0

    def text(self) -> dict:
        """The response's ``text`` options: the request's format (``text`` when none was given)."""
        fmt = self.req.text.format if self.req.text is not None else None
        return {"format": {"type": "text"} if fmt is None else fmt.model_dump(by_alias=True, exclude_none=True)}

    def _part(self, text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _message(self, text: str | None, status: str) -> dict:
        content = [] if text is None else [self._part(text)]
        return {"id": self.msg_id, "type": "message", "status": status, "role": "assistant", "content": content}

    def response(self, r: ChoiceResult | None) -> dict:
        """The Response object: in progress (``r`` None), or complete / incomplete once ``r`` is finished."""
        status = "in_progress" if r is None else "incomplete" if r.finish_reason == "length" else "completed"
        req = self.req
        body = {
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": self.model,
            "output": [] if r is None else [self._message(r.text, status)], "parallel_tool_calls": True,
            "previous_response_id": None, "reasoning": {"effort": None, "summary": None}, "store": False,
            "temperature": 1.0 if req.temperature is None else req.temperature, "text": self.text(),
            "tool_choice": "auto", "tools": [], "top_p": 1.0 if req.top_p is None else req.top_p,
            "truncation": "disabled", "usage": None, "user": None, "metadata": {},
        }
        if r is not None:
            body["usage"] = {"input_tokens": self.input_tokens,
                             "input_tokens_details": {"cached_tokens": r.cached_tokens},
                             "output_tokens": r.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                             "total_tokens": self.input_tokens + r.completion_tokens}
        return body

    def _event(self, kind: str, **fields: Any) -> str:
        self.seq += 1
        return sse({"type": kind, "sequence_number": self.seq - 1, **fields}, event=kind)

    def error_event(self, e: APIError) -> str:
        return self._event("error", code=e.code, message=e.message, param=e.param)

    async def events(self, choice_events: AsyncIterator[ChoiceEvent]) -> AsyncIterator[str]:
        where = {"item_id": self.msg_id, "output_index": 0, "content_index": 0}
        yield self._event("response.created", response=self.response(None))
        yield self._event("response.in_progress", response=self.response(None))
        yield self._event("response.output_item.added", output_index=0, item=self._message(None, "in_progress"))
        yield self._event("response.content_part.added", **where, part=self._part(""))
        result = ChoiceResult()
        async for ev in choice_events:
            result.add(ev)
            if ev.text:
                yield self._event("response.output_text.delta", **where, delta=ev.text, logprobs=[])
        final = self.response(result)
        yield self._event("response.output_text.done", **where, text=result.text, logprobs=[])
        yield self._event("response.content_part.done", **where, part=self._part(result.text))
        yield self._event("response.output_item.done", output_index=0, item=final["output"][0])
        yield self._event(f"response.{final['status']}", response=final)
