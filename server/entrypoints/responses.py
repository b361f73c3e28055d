"""OpenAI's Responses API, ``POST /v1/responses``, for text: ``input`` (a string or a list of messages with text
content), ``instructions`` (a system message placed first), ``max_output_tokens``, ``temperature``, ``top_p``,
``stream``. The prompt is the chat template's rendering of the messages, as for chat completions.

Conversations: with ``store`` (OpenAI's default: true) a response is kept in memory, its input and output
messages (instructions excepted, as OpenAI does); ``previous_response_id`` continues it: the stored messages come
before the new input. :class:`ResponseStore` keeps the last ``MAX_STORED_RESPONSES`` responses (least recently used
dropped first); an unknown or dropped id is a 404. ``GET /v1/responses/{id}`` returns a stored response.

With ``--reasoning-parser`` the output starts with a ``reasoning`` item (its text in ``content`` as
``reasoning_text``) before the message. ``text.format`` (``json_schema``, ``json_object``) constrains the output
(server/entrypoints/structured.py). Tools and the other output-changing fields are refused unless neutral. A stream
sends OpenAI's typed events (``event: response.created`` ... ``response.reasoning_text.delta`` ...
``response.output_text.delta`` ... ``response.completed``, or ``response.incomplete`` when ``max_output_tokens``
ended it), each with its ``sequence_number``; there is no ``[DONE]``.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Annotated, Any, ClassVar, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from server.entrypoints.chat_output import ChatOutput, ChatOutputConfig
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
from server.entrypoints.reasoning_parsers import ReasoningParser
from server.entrypoints.serving import PROMPT_TAIL_TOKENS
from server.entrypoints.streaming import CLIENT_CLOSED_REQUEST, ChoiceResult, collect, sse, stream
from server.entrypoints.structured import TextOptions, text_format_structured_output
from server.entrypoints.tokenizer_manager import ChoiceEvent, TokenizerManager
from server.entrypoints.tool_parsers import tool_parser_class
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
        "conversation": None, "background": False, "tools": [],
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
    store: bool = True
    previous_response_id: str | None = None
    text: TextOptions | None = None


MAX_STORED_RESPONSES = 1024


class ResponseStore:
    """Stored responses, least recently used dropped first beyond ``limit``: each response object and the
    conversation it ends (the messages to put before a continuation's input)."""

    def __init__(self, limit: int = MAX_STORED_RESPONSES):
        self.limit = limit
        self._items: OrderedDict[str, tuple[dict, list[dict[str, Any]]]] = OrderedDict()

    def put(self, response: dict, conversation: list[dict[str, Any]]) -> None:
        self._items[response["id"]] = (response, conversation)
        self._items.move_to_end(response["id"])
        while len(self._items) > self.limit:
            self._items.popitem(last=False)

    def get(self, response_id: str, param: str | None = None) -> tuple[dict, list[dict[str, Any]]]:
        """The response and its conversation; 404 if it was never stored or was dropped."""
        if response_id not in self._items:
            raise APIError(404, f"Response with id '{response_id}' not found: it was not stored (store: false), or "
                           f"this server dropped it (it keeps the last {self.limit}), or it restarted.",
                           param=param, code="response_not_found")
        self._items.move_to_end(response_id)
        return self._items[response_id]


def _input_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    items = [InputMessage(role="user", content=req.input)] if isinstance(req.input, str) else req.input
    messages = [ChatMessage(role=m.role, content=m.content if isinstance(m.content, str)
                            else "\n".join(p.text for p in m.content)) for m in items]
    return chat_messages(messages)


class ResponsesServing:
    """``POST /v1/responses``; ``tm`` does the engine work."""

    def __init__(self, tm: TokenizerManager, served_model_name: str, reasoning: type[ReasoningParser] | None = None):
        self.tm = tm
        self.model = served_model_name
        self.reasoning = reasoning
        self.store = ResponseStore()

    def retrieve(self, response_id: str) -> dict:
        """``GET /v1/responses/{id}``: a stored response."""
        return self.store.get(response_id)[0]

    async def create(self, request: Request) -> Response:
        arrival = time.monotonic()
        req = await parse_body_off_loop(await request.body(), ResponsesRequest)
        self.tm.check_available()
        check_model(req.model, self.model)
        history = [] if req.previous_response_id is None else self.store.get(req.previous_response_id,
                                                                            "previous_response_id")[1]
        conversation = [*history, *_input_messages(req)]
        system = [] if req.instructions is None else [{"role": "system", "content": req.instructions}]
        prompt_ids = await self.tm.encode_chat(system + conversation, param="input")
        max_tokens = req.max_output_tokens
        if max_tokens is None:
            max_tokens = self.tm.default_max_tokens(len(prompt_ids)) or max(self.tm.max_model_len - len(prompt_ids), 1)
        check_context_length(len(prompt_ids), max_tokens, self.tm.max_model_len, "input", "'max_output_tokens'")
        params = make_sampling_params({"max_tokens": "max_output_tokens"}, max_tokens=max_tokens,
                                      temperature=req.temperature, top_p=req.top_p,
                                      structured=structured_output(text_format_structured_output, req.text))
        reasoning = None
        if self.reasoning is not None:
            reasoning = self.reasoning()
            tail = await self.tm.decode(prompt_ids[-PROMPT_TAIL_TOKENS:], skip_special_tokens=False)
            if reasoning.special_tokens:
                params.skip_special_tokens = False
        config = ChatOutputConfig(
            reasoning=reasoning, in_reasoning=reasoning is not None and reasoning.starts_in_reasoning(tail, None),
            content_parser=tool_parser_class(reasoning.content_tool_parser, None)(None)
            if reasoning is not None and reasoning.content_tool_parser else None,
            control_tokens=tuple(self.tm.tokenizer.control_tokens) if reasoning and reasoning.special_tokens else ())
        gen = self.tm.submit([prompt_ids], [params], arrival)
        shape = _Shape(req, self.model, len(prompt_ids), config)
        keep = (lambda body: self.store.put(body, [*conversation, {"role": "assistant", "content": shape.answer}])
                ) if req.store else (lambda body: None)
        if req.stream:
            return await stream(request, gen, lambda events: shape.events(events, keep), shape.error_event,
                                done=None)
        results = await collect(request, gen)
        if results is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        body = shape.response(results[0])
        keep(body)
        return JSONResponse(body)


class _Shape:
    """The Response object and the stream's events of one request; ``config`` reads the text (the reasoning apart,
    with a reasoning parser)."""

    def __init__(self, req: ResponsesRequest, model: str, input_tokens: int, config: ChatOutputConfig):
        self.req, self.model, self.input_tokens, self.config = req, model, input_tokens, config
        self.id = f"resp_{uuid.uuid4().hex}"
        self.msg_id = f"msg_{uuid.uuid4().hex}"
        self.rs_id = f"rs_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.seq = 0
        self.answer = ""  # the message's text, once finished (what a continuation sends back)

    def text(self) -> dict:
        """The response's ``text`` options: the request's format (``text`` when none was given)."""
        fmt = self.req.text.format if self.req.text is not None else None
        return {"format": {"type": "text"} if fmt is None else fmt.model_dump(by_alias=True, exclude_none=True)}

    def _part(self, text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _message(self, text: str | None, status: str) -> dict:
        content = [] if text is None else [self._part(text)]
        return {"id": self.msg_id, "type": "message", "status": status, "role": "assistant", "content": content}

    def _reasoning(self, text: str | None, status: str) -> dict:
        content = [] if text is None else [{"type": "reasoning_text", "text": text}]
        return {"id": self.rs_id, "type": "reasoning", "summary": [], "content": content, "status": status}

    def response(self, r: ChoiceResult | None) -> dict:
        """The Response object: in progress (``r`` None), or complete / incomplete once ``r`` is finished."""
        status = "in_progress" if r is None else "incomplete" if r.finish_reason == "length" else "completed"
        req = self.req
        output = []
        if r is not None:
            message = ChatOutput(self.config).message(r.text)
            self.answer = message["content"] or ""
            if self.config.reasoning is not None:
                output.append(self._reasoning(message.get("reasoning_content") or "", status))
            output.append(self._message(self.answer, status))
        body = {
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": self.model,
            "output": output, "parallel_tool_calls": True,
            "previous_response_id": req.previous_response_id, "reasoning": {"effort": None, "summary": None},
            "store": req.store,
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

    async def events(self, choice_events: AsyncIterator[ChoiceEvent], keep) -> AsyncIterator[str]:
        """The typed events; a reasoning item (with a reasoning parser) comes first, then the message. ``keep``
        gets the final response (to store it)."""
        yield self._event("response.created", response=self.response(None))
        yield self._event("response.in_progress", response=self.response(None))
        reader = ChatOutput(self.config)
        result = ChoiceResult()
        reasoning = self.config.reasoning is not None
        msg_at = {"item_id": self.msg_id, "output_index": int(reasoning), "content_index": 0}
        rs_at = {"item_id": self.rs_id, "output_index": 0, "content_index": 0}
        if reasoning:
            yield self._event("response.output_item.added", output_index=0, item=self._reasoning(None, "in_progress"))
        message_open = False
        reasoning_text = ""
        async for ev in choice_events:
            result.add(ev)
            delta = reader.delta(ev.text, ev.finish_reason is not None)
            if delta.get("reasoning_content"):
                reasoning_text += delta["reasoning_content"]
                yield self._event("response.reasoning_text.delta", **rs_at, delta=delta["reasoning_content"])
            if delta.get("content"):
                if not message_open:
                    message_open = True
                    for e in self._open_message(reasoning, reasoning_text, msg_at):
                        yield e
                yield self._event("response.output_text.delta", **msg_at, delta=delta["content"], logprobs=[])
        final = self.response(result)
        if not message_open:
            for e in self._open_message(reasoning, reasoning_text, msg_at):
                yield e
        yield self._event("response.output_text.done", **msg_at, text=self.answer, logprobs=[])
        yield self._event("response.content_part.done", **msg_at, part=self._part(self.answer))
        yield self._event("response.output_item.done", output_index=msg_at["output_index"], item=final["output"][-1])
        keep(final)
        yield self._event(f"response.{final['status']}", response=final)

    def _open_message(self, reasoning: bool, reasoning_text: str, msg_at: dict) -> list[str]:
        """The events that close the reasoning item (if any) and open the message."""
        events = []
        if reasoning:
            rs_at = {"item_id": self.rs_id, "output_index": 0, "content_index": 0}
            events.append(self._event("response.reasoning_text.done", **rs_at, text=reasoning_text))
            events.append(self._event("response.output_item.done", output_index=0,
                                      item=self._reasoning(reasoning_text, "completed")))
        events.append(self._event("response.output_item.added", output_index=msg_at["output_index"],
                                  item=self._message(None, "in_progress")))
        events.append(self._event("response.content_part.added", **msg_at, part=self._part("")))
        return events
