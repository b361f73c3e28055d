"""What every tool-call parser shares: the parsed shape of a model's text, and the rule that makes streaming work.

A parser reads the whole text generated so far and returns its ``content`` (the text outside tool calls) and its
``calls``. It is called on every prefix of the output while streaming (``final=False``) and once on the whole
output (``final=True``); the streaming layer (:mod:`server.entrypoints.chat_output`) sends the difference between
consecutive answers. So a parser must be *monotone*: on a longer prefix, the content extends the previous content,
the calls extend the previous calls, and a call's name, once given, stays. A call's ``arguments`` is ``None`` until
the call is complete (its arguments are then sent in one piece); a parser holds back text at the end of a prefix
that may still turn into a tool-call marker (:func:`held_back`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ParsedCall:
    """One tool call: the function's name and its arguments as JSON text (None while still being generated)."""

    name: str
    arguments: str | None = None
    id: str | None = None  # a format that names its calls (Kimi-K2: ``functions.get_weather:0``)


@dataclass
class ParsedTools:
    """A text split into content and tool calls."""

    content: str
    calls: list[ParsedCall] = field(default_factory=list)


def held_back(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``markers`` (it may still become
    that marker, so it is not content yet)."""
    longest = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), longest, -1):
            if text.endswith(m[:n]):
                longest = n
                break
    return longest


def content_before(text: str, markers: tuple[str, ...], final: bool) -> str:
    """``text`` as content: all of it when final, else without the end that may become a marker."""
    return text if final else text[: len(text) - held_back(text, markers)]


def json_arguments(value: Any) -> str:
    """Arguments as OpenAI sends them: a JSON object's text."""
    return json.dumps(value, ensure_ascii=False)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def param_types(tools: list[dict] | None, name: str) -> dict[str, Any]:
    """The JSON-schema ``type`` of each parameter of tool ``name`` (formats that write values as bare text need
    them to tell the string ``"5"`` from the number 5)."""
    for tool in tools or []:
        fn = tool.get("function", tool)
        if fn.get("name") == name:
            props = (fn.get("parameters") or {}).get("properties") or {}
            return {k: (v or {}).get("type") for k, v in props.items() if isinstance(v, dict)}
    return {}


def typed_value(text: str, kind: Any) -> Any:
    """A parameter written as bare text, as the type its schema gives: strings stay text; other types (or an
    unknown type) are read as JSON when they parse, else kept as text."""
    if kind == "string" or (isinstance(kind, list) and "string" in kind and len(kind) == 1):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


class ToolParser:
    """Turns a model's text into content and OpenAI tool calls. Subclasses set ``name``, ``markers`` (the texts
    that start a tool-call region, held back while partial) and implement :meth:`parse`. ``detect``: texts the
    family's chat template all hold (``--tool-call-parser auto`` tries the parsers in registry order).
    ``special_tokens``: the format's markers are special tokens, so the output is detokenized with them kept."""

    name: str = ""
    markers: tuple[str, ...] = ()
    detect: tuple[str, ...] = ()
    special_tokens: bool = False

    def __init__(self, tools: list[dict] | None = None):
        self.tools = tools

    def parse(self, text: str, final: bool) -> ParsedTools:
        raise NotImplementedError


def split_regions(text: str, begin: str, end: str, final: bool) -> tuple[str, list[tuple[str, bool]]]:
    """Split ``text`` at ``begin`` ... ``end`` regions: the text outside them (content; while not ``final``, without
    an end that may become ``begin``) and each region's body with whether its ``end`` was seen."""
    content, regions, pos = [], [], 0
    while True:
        start = text.find(begin, pos)
        if start < 0:
            content.append(content_before(text[pos:], (begin,), final))
            break
        content.append(text[pos:start])
        stop = text.find(end, start + len(begin))
        if stop < 0:
            regions.append((text[start + len(begin):], False))
            break
        regions.append((text[start + len(begin):stop], True))
        pos = stop + len(end)
    return "".join(content), regions


class RegionToolParser(ToolParser):
    """A format whose calls sit in ``begin`` ... ``end`` regions of the text; :meth:`calls_in` reads one region."""

    begin: str = ""
    end: str = ""

    def parse(self, text: str, final: bool) -> ParsedTools:
        content, regions = split_regions(text, self.begin, self.end, final)
        calls = [c for body, closed in regions for c in self.calls_in(body, closed or final)]
        return ParsedTools(content, calls)

    def calls_in(self, body: str, closed: bool) -> list[ParsedCall]:
        """The calls of one region's body: complete ones with arguments, a call still being written with its name
        once the name is whole (and arguments None). ``closed``: the body is whole (its end marker was seen, or the
        output ended)."""
        raise NotImplementedError
