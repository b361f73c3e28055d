"""A chat choice's text as OpenAI's message: ``reasoning_content``, ``content`` and ``tool_calls``, whole or as
streamed deltas.

The reasoning parser (``--reasoning-parser``) splits the text first; the tool-call parser (``--tool-call-parser``)
reads the answer part. With ``tool_choice: "required"`` or a named function the output is constrained to JSON
(:mod:`server.entrypoints.tool_choice`) and read as such instead. Streaming re-parses the text so far after every
event and sends what grew (the parsers are monotone, see :mod:`server.entrypoints.tool_parsers.base`): reasoning
and content deltas, then for each tool call a first delta with its ``index``, ``id``, ``type`` and
``function.name`` and later deltas with fragments of ``function.arguments``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from server.entrypoints.reasoning_parsers import ReasoningParser
from server.entrypoints.tool_parsers import ParsedCall, ParsedTools, ToolParser
from server.entrypoints.tool_parsers.base import held_back, new_call_id
from server.entrypoints.tool_parsers.hermes import json_call


def required_calls(text: str, final: bool) -> list[ParsedCall]:
    """The calls of ``tool_choice: "required"``'s output, a JSON array of ``{"name", "parameters"}`` objects:
    each complete element, then the name of the one being written."""
    body = text.lstrip()
    if not body.startswith("["):
        return []
    calls, pos, decoder = [], 1, json.JSONDecoder()
    while True:
        while pos < len(body) and body[pos] in " \n\t\r,":
            pos += 1
        if pos >= len(body) or body[pos] == "]":
            return calls
        try:
            obj, pos = decoder.raw_decode(body, pos)
        except ValueError:
            call = json_call(body[pos:], closed=final)
            return calls + ([call] if call else [])
        call = json_call(json.dumps(obj), closed=True) if isinstance(obj, dict) else None
        if call is None:
            return calls
        calls.append(call)


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


@dataclass
class _Parsed:
    reasoning: str = ""
    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)


class ChatOutput:
    """One choice's reader: :meth:`delta` after every event (what to stream), :meth:`message` at the end."""

    def __init__(self, config: ChatOutputConfig):
        self.config = config
        self.text = ""
        self._sent = _Parsed()
        self._sent_args: list[int] = []
        self._ids: list[str] = []

    def _strip(self, text: str, final: bool) -> str:
        """``text`` without control tokens (and, while streaming, without an end that may become one)."""
        for token in self.config.control_tokens:
            text = text.replace(token, "")
        return text if final else text[: len(text) - held_back(text, self.config.control_tokens)]

    def _parse(self, final: bool) -> _Parsed:
        c = self.config
        text, reasoning = self.text, ""
        if c.reasoning is not None:
            r = c.reasoning.parse(text, final, c.in_reasoning)
            text, reasoning = r.content, r.reasoning
        if c.content_parser is not None and (c.mode in ("named", "required") or c.tools is None):
            text = c.content_parser.parse(text, final).content
        if c.mode == "named":
            parsed = ParsedTools("", [ParsedCall(c.function, text)])
        elif c.mode == "required":
            parsed = ParsedTools("", required_calls(text, final))
        elif c.tools is not None and c.mode != "none":
            parsed = c.tools.parse(text, final)
        else:
            parsed = ParsedTools(text)
        calls = parsed.calls[:1] if c.single_call else parsed.calls
        reasoning = self._strip(reasoning, final) if c.include_reasoning else ""
        return _Parsed(reasoning, self._strip(parsed.content, final), calls)

    def _grown(self, now: _Parsed) -> dict:
        """The delta from what was sent to ``now`` (parts that did not grow are left out)."""
        delta: dict = {}
        sent = self._sent
        if now.reasoning.startswith(sent.reasoning) and len(now.reasoning) > len(sent.reasoning):
            delta["reasoning_content"] = delta["reasoning"] = now.reasoning[len(sent.reasoning):]
            sent.reasoning = now.reasoning
        if now.content.startswith(sent.content) and len(now.content) > len(sent.content):
            delta["content"] = now.content[len(sent.content):]
            sent.content = now.content
        calls = []
        for i, call in enumerate(now.calls):
            entry: dict = {"index": i}
            if i == len(self._ids):
                self._ids.append(call.id or new_call_id())
                self._sent_args.append(0)
                entry |= {"id": self._ids[i], "type": "function", "function": {"name": call.name, "arguments": ""}}
            args = call.arguments or ""
            if len(args) > self._sent_args[i]:
                entry.setdefault("function", {})["arguments"] = args[self._sent_args[i]:]
                self._sent_args[i] = len(args)
            if len(entry) > 1:
                calls.append(entry)
        if calls:
            delta["tool_calls"] = calls
        return delta

    @property
    def _plain(self) -> bool:
        """No parser reads the text: it is all content, passed through as it comes."""
        c = self.config
        return c.reasoning is None and c.content_parser is None and c.mode != "named" and c.mode != "required" and (
            c.tools is None or c.mode == "none") and not c.control_tokens

    def delta(self, text: str, final: bool) -> dict:
        """Add an event's text; the message delta to stream (``final``: the choice ended)."""
        if self._plain:
            return {"content": text} if text else {}
        self.text += text
        return self._grown(self._parse(final))

    @property
    def has_calls(self) -> bool:
        return bool(self._ids)

    def message(self, text: str, truncated: bool = False) -> dict:
        """The whole message of a choice whose text is ``text``. ``truncated``: ``max_tokens`` ended it, so a
        constrained call (``required``, a named function) is incomplete and left out, as vLLM answers. Both
        ``reasoning_content`` (SGLang, earlier vLLM) and ``reasoning`` (vLLM's newer name) carry the reasoning."""
        self.text = text
        parsed = self._parse(final=True)
        if truncated and self.config.mode in ("named", "required"):
            parsed.calls = []
        self._grown(parsed)  # assigns the calls' ids
        constrained = self.config.mode in ("named", "required")
        content = parsed.content if parsed.content or not parsed.calls or constrained else None
        msg: dict = {"role": "assistant", "content": content}
        if self.config.reasoning is not None and self.config.include_reasoning:
            msg["reasoning_content"] = msg["reasoning"] = parsed.reasoning or None
        if parsed.calls:
            msg["tool_calls"] = [
                {"id": self._ids[i], "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments if c.arguments is not None else ""}}
                for i, c in enumerate(parsed.calls)]
        return msg


def finish_reason(reason: str | None, has_calls: bool) -> str | None:
    """OpenAI's ``tool_calls`` for a choice that ended by itself after calling tools."""
    return "tool_calls" if reason == "stop" and has_calls else reason
