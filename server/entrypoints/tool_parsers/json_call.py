"""Calls written as JSON objects ``{"name": ..., "arguments": {...}}`` (Hermes / Qwen, Llama-3 with
``"parameters"``, and ``tool_choice: "required"``'s array), read one character at a time: the call starts once its
name's string is closed, and the arguments' value streams as written (a value written as a JSON string is read
whole and its text is the arguments)."""

from __future__ import annotations

import json

from server.entrypoints.tool_parsers.base import StreamReader


def _decoded(literal: str) -> object:
    try:
        return json.loads(literal)
    except ValueError:
        return None


class JsonCall:
    """One call object read character by character (:meth:`feed` stops after its closing brace). The object's
    top-level keys are read; ``"name"`` starts the call, the first of ``arg_keys`` streams its value through
    ``out`` (held until the name is known, trailing whitespace until more follows). A call whose object ends
    without arguments has ``{}``; one without a name is no call."""

    def __init__(self, out: StreamReader, arg_keys: tuple[str, ...]):
        self.out, self.arg_keys = out, arg_keys
        self.phase = "start"  # start, key, colon, value, done
        self.depth = 0  # open objects and arrays, outside strings
        self.in_string = self.escaped = False
        self.key: object = None
        self.token: list[str] = []  # the key's characters, or the name's or a string argument's value
        self.name: str | None = None
        self.args = "none"  # none, raw (streaming), string (read whole), done
        self.space = ""  # whitespace inside the raw arguments, sent with the next character
        self.pending: list[str] = []  # argument text written before the name
        self.closed = False

    def feed(self, text: str) -> int:
        """Read ``text``; the number of characters that belong to this object."""
        for i, c in enumerate(text):
            if self.phase == "done":
                return i
            self._char(c)
        return len(text)

    def _string_char(self, c: str) -> None:
        if self.escaped:
            self.escaped = False
        elif c == "\\":
            self.escaped = True
        elif c == '"':
            self.in_string = False

    def _char(self, c: str) -> None:
        if self.phase == "start":
            if c == "{":
                self.phase, self.depth = "key", 1
        elif self.phase == "key":
            if self.in_string:
                self.token.append(c)
                self._string_char(c)
                if not self.in_string:
                    self.key, self.phase = _decoded("".join(self.token)), "colon"
            elif c == '"':
                self.in_string, self.token = True, [c]
            elif c == "}":
                self._done()
        elif self.phase == "colon":
            if c == ":":
                self.phase, self.token = "value", []
        elif not self.in_string and self.depth == 1 and c in ",}":
            self._end_value()
            if c == "}":
                self._done()
            else:
                self.phase = "key"
        else:
            if self.in_string:
                self._string_char(c)
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
            self._value_char(c)

    def _value_char(self, c: str) -> None:
        if self.key == "name" and self.name is None:
            self.token.append(c)
        elif self.key in self.arg_keys and self.args in ("none", "raw", "string"):
            if self.args == "none":
                if c.isspace():
                    return
                self.args = "string" if c == '"' else "raw"
            if self.args == "string":
                self.token.append(c)
            elif c.isspace():
                self.space += c
            else:
                self._arguments(self.space + c)
                self.space = ""

    def _arguments(self, text: str) -> None:
        if self.name is None:
            self.pending.append(text)
        else:
            self.out.arguments(text)

    def _end_value(self) -> None:
        if self.key == "name" and self.name is None:
            name = _decoded("".join(self.token).strip())
            if isinstance(name, str):
                self.name = name
                self.out.start_call(name)
                self.out.arguments("".join(self.pending))
        elif self.key in self.arg_keys and self.args in ("raw", "string"):
            if self.args == "string":
                literal = "".join(self.token)
                value = _decoded(literal)
                self._arguments(value if isinstance(value, str) else literal)
            self.args = "done"

    def _done(self) -> None:
        self.phase, self.depth = "done", 0
        self.close()

    def close(self) -> None:
        """The object ended, or the text did: finish an open value, and give a named call without arguments
        ``{}``."""
        if self.closed:
            return
        self.closed = True
        if self.phase == "value":
            self._end_value()
        if self.name is not None and self.args == "none":
            self.out.arguments("{}")


class RequiredCalls(StreamReader):
    """``tool_choice: "required"``'s output (:mod:`server.entrypoints.tool_choice`): a JSON array of
    ``{"name": ..., "parameters": {...}}`` calls."""

    def __init__(self) -> None:
        super().__init__()
        self.call: JsonCall | None = None

    def step(self) -> bool:
        if self.state == "text":  # before the array
            lead = self.buf.lstrip()
            if not lead:
                return False
            self.buf, self.state = lead[1:], "between" if lead[0] == "[" else "end"
            return True
        if self.state == "between":
            self.buf = self.buf.lstrip(" \t\r\n,")
            if not self.buf:
                return False
            if self.buf[0] != "{":
                self.state = "end"
                return True
            self.call, self.state = JsonCall(self, ("parameters",)), "call"
            return True
        if self.state == "call":
            n = self.call.feed(self.buf)
            self.buf = self.buf[n:]
            if self.call.phase != "done":
                return False
            self.state = "between"
            return True
        self.buf = ""  # after the array
        return False

    def finish(self) -> None:
        if self.call is not None:
            self.call.close()
