"""A chat choice's text as OpenAI's message: ``reasoning_content``, ``content`` and ``tool_calls``, whole or as
streamed deltas.

The reasoning parser (``--reasoning-parser``) splits the text first; the tool-call parser (``--tool-call-parser``)
reads the answer part. With ``tool_choice: "required"`` or a named function the output is constrained to JSON
(:mod:`server.entrypoints.tool_choice`) and read as such instead. Every parser reads each piece of text once, as it
arrives (:mod:`server.entrypoints.tool_parsers.base`), so a stream sends what each event adds: reasoning and content
deltas, and for each tool call a first delta with its ``index``, ``id``, ``type`` and ``function.name``, then
fragments of ``function.arguments`` as the model writes them. The whole message is the same readers fed the whole
text at once, so a stream's deltas add up to it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from server.entrypoints.reasoning_parsers import ReasoningParser
from server.entrypoints.tool_parsers import CallDelta, ToolParser
from server.entrypoints.tool_parsers.base import StreamReader, new_call_id
from server.entrypoints.tool_parsers.json_call import RequiredCalls

CONSTRAINED = ("named", "required")


def constrained_complete(mode: str, text: str) -> bool:
    """Whether a constrained output is whole: a named function's arguments object, or ``required``'s array of
    ``{"name", "parameters"}`` calls. A grammar that ran to its end gives one; ``max_tokens`` or a stop string may
    cut it short, and such a call is not reported."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    if mode == "named":
        return isinstance(value, dict)
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, dict) and isinstance(v.get("name"), str) and isinstance(v.get("parameters"), dict)
        for v in value)


class TokenFilter(StreamReader):
    """Text without the given control tokens (the parsers that read special tokens keep them in the detokenized
    text); the end of a piece that may still become one is held back."""

    def __init__(self, tokens: tuple[str, ...]):
        super().__init__()
        self.tokens = tokens
        self.firsts = {t[0] for t in tokens if t}

    def text(self, piece: str, final: bool) -> str:
        return self.feed(piece, final).content

    def step(self) -> bool:
        if not any(c in self.buf for c in self.firsts):
            self.content(self.buf)
            self.buf = ""
            return False
        text, mark = self.until(self.tokens)
        self.content(text)
        return mark is not None


@dataclass
class ChatOutputConfig:
    """How one request's choices are read: the parsers (None: off); whether the output starts in the reasoning
    and whether it may hold any; the request's ``tool_choice`` as ``mode`` (``none``, ``auto``, ``required`` or
    ``named``) with ``function`` the named one; ``content_parser``, the format the answer is always read with
    (gpt-oss's harmony); whether the reasoning is returned; whether only the first call is kept
    (``parallel_tool_calls: false``); and the control tokens to drop from the text (parsers that read special
    tokens keep them in the detokenized text)."""

    reasoning: ReasoningParser | None = None
    in_reasoning: bool = False
    may_reason: bool = False
    tools: ToolParser | None = None
    content_parser: ToolParser | None = None
    mode: str = "none"
    function: str | None = None
    include_reasoning: bool = True
    single_call: bool = False
    control_tokens: tuple[str, ...] = ()


class ChatOutput:
    """One choice's reader: :meth:`delta` after every event (what to stream), or :meth:`message` once for the whole
    text."""

    def __init__(self, config: ChatOutputConfig):
        self.config = c = config
        self._reasoning = c.reasoning.reader(c.in_reasoning) if c.reasoning is not None else None
        # the content format (gpt-oss's harmony) reads the answer unless the tool parser reads it
        self._content = (c.content_parser.reader() if c.content_parser is not None
                         and (c.mode != "auto" or c.tools is None) else None)
        self._tools: StreamReader | None = None
        if c.mode == "required":
            self._tools = RequiredCalls()
        elif c.mode == "auto" and c.tools is not None:
            self._tools = c.tools.reader()
        self._filters = (TokenFilter(c.control_tokens), TokenFilter(c.control_tokens))
        self._answer: list[str] = []  # a constrained output, checked whole at the end
        self._complete: bool | None = None  # ... and whether it was whole (known at the end)
        self._calls: list[dict] = []  # each call's id, name and arguments so far
        self._reasoning_text = self._content_text = ""

    @property
    def _plain(self) -> bool:
        """No parser reads the text: it is all content, passed through as it comes."""
        c = self.config
        return (self._reasoning is None and self._content is None and self._tools is None
                and c.mode not in CONSTRAINED and not c.control_tokens)

    def delta(self, text: str, final: bool) -> dict:
        """Add an event's text; the message delta to stream (``final``: the choice ended)."""
        c = self.config
        if self._plain:
            self._content_text += text
            return {"content": text} if text else {}
        reasoning = ""
        if self._reasoning is not None:
            r = self._reasoning.read(text, final)
            reasoning, text = r.reasoning, r.content
        if self._content is not None:
            text = self._content.feed(text, final).content
        calls: list[CallDelta] = []
        if c.mode in CONSTRAINED:
            self._answer.append(text)
            if c.mode == "named":  # the text is the arguments
                calls = [CallDelta(0, name=None if self._calls else c.function, arguments=text)] if text else []
            else:
                calls = self._tools.feed(text, final).calls
            text = ""
            if final:
                self._complete = constrained_complete(c.mode, "".join(self._answer))
        elif self._tools is not None:
            d = self._tools.feed(text, final)
            text, calls = d.content, d.calls
        reasoning = self._filters[0].text(reasoning, final) if c.include_reasoning else ""
        content = self._filters[1].text(text, final)
        if c.single_call:
            calls = [d for d in calls if d.index == 0]
        return self._delta(reasoning, content, calls)

    def _delta(self, reasoning: str, content: str, calls: list[CallDelta]) -> dict:
        """OpenAI's delta of what was read, recorded for :meth:`message`; parts that did not grow are left out."""
        delta: dict = {}
        if reasoning:
            delta["reasoning_content"] = delta["reasoning"] = reasoning
            self._reasoning_text += reasoning
        if content:
            delta["content"] = content
            self._content_text += content
        entries = []
        for d in calls:
            if d.name is not None:
                self._calls.append({"id": d.id or new_call_id(), "name": d.name, "arguments": ""})
                call = self._calls[d.index]
                entries.append({"index": d.index, "id": call["id"], "type": "function",
                                "function": {"name": d.name, "arguments": d.arguments}})
            else:
                entries.append({"index": d.index, "function": {"arguments": d.arguments}})
            self._calls[d.index]["arguments"] += d.arguments
        if entries:
            delta["tool_calls"] = entries
        return delta

    @property
    def has_calls(self) -> bool:
        """Whether the choice holds calls that are whole (a constrained output's only once it ended whole)."""
        if self.config.mode in CONSTRAINED:
            return bool(self._complete)
        return bool(self._calls)

    def message(self, text: str) -> dict:
        """The whole message of a choice whose text is ``text`` (a fresh reader fed it at once). A constrained call
        (``required``, a named function) that is not whole (``max_tokens`` or a stop string cut it) is left out,
        as vLLM answers, with empty content. Both ``reasoning_content`` (SGLang, earlier vLLM) and ``reasoning``
        (vLLM's newer name) carry the reasoning."""
        self.delta(text, final=True)
        constrained = self.config.mode in CONSTRAINED
        calls = self._calls if self.has_calls else []
        content = self._content_text if self._content_text or not calls or constrained else None
        msg: dict = {"role": "assistant", "content": "" if constrained else content}
        if self.config.reasoning is not None and self.config.include_reasoning:
            msg["reasoning_content"] = msg["reasoning"] = self._reasoning_text or None
        if calls:
            msg["tool_calls"] = [{"id": c["id"], "type": "function",
                                  "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]
        return msg


def finish_reason(reason: str | None, has_calls: bool) -> str | None:
    """OpenAI's ``tool_calls`` for a choice that ended by itself after calling tools."""
    return "tool_calls" if reason == "stop" and has_calls else reason
