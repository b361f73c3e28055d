"""What every tool-call parser shares: incremental reading of a model's text, and the deltas it yields.

A parser reads one choice's text as it arrives (:meth:`StreamReader.feed`, once per event, ``final`` on the
last) and yields what the new text adds: ``content`` (the text outside tool calls) and, per call, a first delta
with its name (and the model's id for formats that name their calls) and then fragments of its arguments' JSON
text. Each piece of text is read once: the reader keeps its state and the unread end of the text (``buf``), which
holds only what may still turn into a marker (:func:`held_back`) or a value that is read whole (a name). So a
stream costs time linear in its length, and the deltas of any split of a text add up to what the whole text gives
in one piece (the non-streamed answer is the same reader fed once).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class CallDelta:
    """What a piece of text adds to call ``index``: its ``name`` (and ``id``) on its first delta, then
    ``arguments`` text to append."""

    index: int
    name: str | None = None
    id: str | None = None  # a format that names its calls (Kimi-K2: ``functions.get_weather:0``)
    arguments: str = ""


@dataclass
class ToolsDelta:
    """What a piece of text adds: content, and call deltas in order."""

    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)


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


def json_arguments(value: Any) -> str:
    """A value as argument JSON text, as OpenAI sends it (``json.dumps``'s separators, non-ASCII kept)."""
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


class StreamReader:
    """Text read once, as it arrives: ``feed`` appends to ``buf`` (the unread text) and runs :meth:`step` until
    it makes no more progress; on the last piece (``final``) nothing is held back and :meth:`finish` closes what the
    text left open. ``state`` names where the reader is; steps write content and calls with :meth:`content`,
    :meth:`start_call` and :meth:`arguments`."""

    def __init__(self) -> None:
        self.buf = ""
        self.final = False
        self.state = "text"
        self.calls = 0  # calls started so far
        self._out = ToolsDelta()

    def feed(self, text: str, final: bool) -> ToolsDelta:
        self.buf += text
        self.final = final
        while self.step():
            pass
        if final:
            self.finish()
        out, self._out = self._out, ToolsDelta()
        return out

    def step(self) -> bool:
        """Read from ``buf`` in the current state; True when the state changed and reading may go on."""
        raise NotImplementedError

    def finish(self) -> None:
        """The text ended: close an open call (its arguments as far as they were written)."""

    def until(self, markers: tuple[str, ...]) -> tuple[str, str | None]:
        """Read up to the first of ``markers``: ``(text before it, the marker)``, both consumed; without one, the
        text that cannot be the start of a marker and None (all of it when final)."""
        hits = [(i, -len(m), m) for m in markers if (i := self.buf.find(m)) >= 0]
        if hits:
            at, _, found = min(hits)  # the first; of two at one place, the longer
            text, self.buf = self.buf[:at], self.buf[at + len(found):]
            return text, found
        keep = 0 if self.final else held_back(self.buf, markers)
        text, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return text, None

    def content(self, text: str) -> None:
        self._out.content += text

    def start_call(self, name: str, call_id: str | None = None) -> None:
        self._out.calls.append(CallDelta(self.calls, name=name, id=call_id))
        self.calls += 1

    def arguments(self, text: str) -> None:
        """Append ``text`` to the arguments of the call started last."""
        if not text:
            return
        last = self._out.calls[-1] if self._out.calls else None
        if last is not None and last.index == self.calls - 1:
            last.arguments += text
        else:
            self._out.calls.append(CallDelta(self.calls - 1, arguments=text))


class ToolParser(StreamReader):
    """Reads one choice's text into content and OpenAI tool calls. Subclasses set ``name`` and implement
    :meth:`step`. ``detect``: texts the family's chat template all hold (``--tool-call-parser auto`` tries the
    parsers in registry order). ``special_tokens``: the format's markers are special tokens, so the output is
    detokenized with them kept. ``tools``: the request's tools (formats that write values as bare text read them
    by their parameters' types)."""

    name: str = ""
    detect: tuple[str, ...] = ()
    special_tokens: bool = False

    def __init__(self, tools: list[dict] | None = None):
        super().__init__()
        self.tools = tools

    def reader(self) -> ToolParser:
        """A fresh parser of the same tools, for one choice."""
        return type(self)(self.tools)
