"""Arguments as they stream: JSON text the model writes between markers (:class:`RawArguments`), or parameters
written as bare text that become a JSON object (:class:`BareArguments`). Both write through a
:class:`~server.entrypoints.tool_parsers.base.StreamReader` and hold back only what the rest of the text may still
change (trailing whitespace, a closing fence, a value of a non-string type)."""

from __future__ import annotations

import json
from typing import Any

from server.entrypoints.tool_parsers.base import StreamReader, json_arguments


class RawArguments:
    """Arguments written as JSON text, streamed as written: leading and trailing whitespace dropped (the trailing
    held back until more text follows) and an optional ``fence`` around them (DeepSeek-V3's ``\\`\\`\\`json`` ...
    ``\\`\\`\\```) removed."""

    def __init__(self, out: StreamReader, fence: tuple[str, str] | None = None):
        self.out, self.fence = out, fence
        self.head = ""  # the start, while it may be whitespace or the opening fence
        self.started = False
        self.fence_read = False  # the opening fence was there and is skipped, or was not there
        self.held = ""
        self.trailing = " \t\r\n" + ("`" if fence else "")

    def add(self, text: str) -> None:
        if not self.started:
            self.head += text
            lead = self.head.lstrip()
            if self.fence is not None and not self.fence_read:
                opening = self.fence[0]
                if len(lead) < len(opening) and opening.startswith(lead):
                    return  # may still be the fence
                self.fence_read = True
                if lead.startswith(opening):
                    lead = lead[len(opening):].lstrip()
            self.head = ""
            if not lead:
                return
            self.started, text = True, lead
        text = self.held + text
        keep = len(text) - len(text.rstrip(self.trailing))
        self.held = text[len(text) - keep:]
        self.out.arguments(text[: len(text) - keep])

    def end(self) -> None:
        """The arguments ended: what was held back is dropped, but for text of the fence's characters that is not
        the closing fence."""
        tail = self.held.rstrip() if self.started else self.head.strip()
        if self.fence is not None and tail.endswith(self.fence[1]):
            tail = tail[: len(tail) - len(self.fence[1])].rstrip()
        self.out.arguments(tail)


def is_string(kind: Any) -> bool:
    return kind == "string" or kind == ["string"]


def typed_value(text: str, kind: Any) -> Any:
    """A parameter written as bare text, as the type its schema gives: strings stay text; other types (or an
    unknown type) are read as JSON when they parse, else kept as text. A boolean may be written as Python writes it
    (``True``: Qwen3-Coder's template renders values with jinja's ``string`` filter)."""
    if is_string(kind):
        return text
    try:
        return json.loads(text)
    except ValueError:
        if kind == "boolean" and text.strip() in ("True", "False"):
            return text.strip() == "True"
        return text


class BareArguments:
    """Parameters written as bare text (Qwen3-Coder, GLM-4.5, MiniMax-M2), streamed as a JSON object's text: each
    parameter's key as soon as it is known; a string parameter's value character by character (JSON-escaped),
    another type's value whole at its end (read by :func:`typed_value`). ``newlines``: the newlines the format
    writes around a value and that are not part of it, ``one`` on each side (Qwen3-Coder), ``all`` of them
    (MiniMax-M2) or ``none`` (GLM-4.5)."""

    def __init__(self, out: StreamReader, types: dict[str, Any], newlines: str):
        self.out, self.types, self.newlines = out, types, newlines
        self.params = 0
        self.kind: Any = None
        self.lead = False  # still at the value's start, where newlines are dropped
        self.held = ""  # trailing newlines that are dropped if the value ends after them
        self.whole: list[str] = []  # a non-string value, read whole

    def begin(self, key: str) -> None:
        self.out.arguments(("{" if not self.params else ", ") + json_arguments(key) + ": ")
        self.params += 1
        self.kind = self.types.get(key)
        if is_string(self.kind):
            self.out.arguments('"')
        self.lead, self.held, self.whole = self.newlines != "none", "", []

    def add(self, text: str) -> None:
        if self.lead and text:
            stripped = text[1:] if self.newlines == "one" and text[0] == "\n" else text
            if self.newlines == "all":
                stripped = text.lstrip("\n")
            self.lead = self.newlines == "all" and not stripped
            text = stripped
        text = self.held + text
        keep = 0
        if self.newlines == "one":
            keep = int(text.endswith("\n"))
        elif self.newlines == "all":
            keep = len(text) - len(text.rstrip("\n"))
        self.held = text[len(text) - keep:]
        text = text[: len(text) - keep]
        if is_string(self.kind):
            self.out.arguments(json_arguments(text)[1:-1])  # escaping is per character, so pieces concatenate
        else:
            self.whole.append(text)

    def end_value(self) -> None:
        if is_string(self.kind):
            self.out.arguments('"')
        else:
            self.out.arguments(json_arguments(typed_value("".join(self.whole), self.kind)))

    def close(self) -> None:
        """The call ended: close the object (``{}`` for a call without parameters)."""
        self.out.arguments("}" if self.params else "{}")
