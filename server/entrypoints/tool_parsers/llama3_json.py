"""Llama-3.1 / 3.2 / 3.3 JSON tool calls: the whole answer is ``{"name": "f", "parameters": {...}}`` (several
separated by ``;``), after an optional ``<|python_tag|>``. An answer that does not start with ``{``, or whose
first object is not a call, is content."""

from __future__ import annotations

from server.entrypoints.tool_parsers.base import ToolParser
from server.entrypoints.tool_parsers.json_call import JsonCall

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    """A JSON object (or ``;``-separated objects) as the whole answer."""

    name = "llama3_json"
    detect = ("Given the following functions, please respond with a JSON for a function call",)

    def __init__(self, tools: list[dict] | None = None):
        super().__init__(tools)
        self.call: JsonCall | None = None
        self.raw = ""  # the text since the last call's start: content if no call follows

    def step(self) -> bool:
        if self.state == "text":  # the answer's start decides: calls or content
            lead = self.buf.lstrip()
            if lead.startswith(PYTHON_TAG):
                lead = lead[len(PYTHON_TAG):].lstrip()
            elif PYTHON_TAG.startswith(lead) and not self.final:
                return False
            if not lead and not self.final:
                return False
            self.state = "between" if lead.startswith("{") else "content"
            if self.state == "between":
                self.raw, self.buf = self.buf[: len(self.buf) - len(lead)], lead
            return True
        if self.state == "content":
            self.content(self.buf)
            self.buf = ""
            return False
        if self.state == "between":
            rest = self.buf.lstrip(" \t\r\n;")
            self.raw += self.buf[: len(self.buf) - len(rest)]
            self.buf = rest
            if not rest:
                return False
            if rest[0] == "{":
                self.call, self.state = JsonCall(self, ("parameters", "arguments")), "call"
            else:
                self._as_content()
            return True
        n = self.call.feed(self.buf)
        self.raw += self.buf[:n]
        self.buf = self.buf[n:]
        if self.call.phase != "done":
            return False
        if self.call.name is None:
            self._as_content()
        else:
            self.raw, self.state = "", "between"
        return True

    def _as_content(self) -> None:
        """What follows the calls (or an object that is not a call) is content, from the text not yet a call's."""
        self.content(self.raw)
        self.raw, self.state = "", "content"

    def finish(self) -> None:
        if self.state == "call":
            self.call.close()
            if self.call.name is None:
                self._as_content()
        elif self.state == "between" and self.raw.strip(" \t\r\n;"):
            self._as_content()
