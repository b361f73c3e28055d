"""GLM-4.5 / GLM-4.6 tool calls: ``<tool_call>NAME\\n<arg_key>KEY</arg_key>\\n<arg_value>VALUE</arg_value>\\n...
</tool_call>``. The template writes strings bare and other values as JSON, so values are read by the schema's
type."""

from __future__ import annotations

from server.entrypoints.tool_parsers.base import ToolParser, param_types
from server.entrypoints.tool_parsers.values import BareArguments

BEGIN, END = "<tool_call>", "</tool_call>"
KEY, KEY_END, VALUE, VALUE_END = "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"


class Glm45ToolParser(ToolParser):
    """``<tool_call>NAME<arg_key>...`` regions (GLM-4.5, GLM-4.6)."""

    name = "glm45"
    detect = ("<arg_key>",)

    def __init__(self, tools: list[dict] | None = None):
        super().__init__(tools)
        self.args: BareArguments | None = None
        self.word = ""  # the name or a key being read

    def step(self) -> bool:
        state = self.state
        if state == "text":
            text, mark = self.until((BEGIN,))
            self.content(text)
            self.state = "name" if mark else state
        elif state == "name":
            text, mark = self.until(("\n", KEY, END))
            self.word += text
            if mark and (self.word.strip() or mark != "\n"):
                name, self.word = self.word.strip(), ""
                if name:
                    self.start_call(name)
                    self.args = BareArguments(self, param_types(self.tools, name), "none")
                    self.state = {KEY: "key", END: "text"}.get(mark, "params")
                    if mark == END:
                        self.args.close()
                else:
                    self.state = "skip" if mark == KEY else "text"
        elif state == "skip":  # a region without a name: not a call
            _, mark = self.until((END,))
            self.state = "text" if mark else state
        elif state == "params":
            _, mark = self.until((KEY, END))
            if mark:
                self._after_params(mark)
        elif state == "key":
            text, mark = self.until((KEY_END, END))
            self.word += text
            if mark == KEY_END:
                self.state = "before_value"
            elif mark:
                self.word = ""
                self._after_params(mark)
        elif state == "before_value":
            _, mark = self.until((VALUE, END))
            key, self.word = self.word.strip(), ("" if mark else self.word)
            if mark == VALUE:
                self.args.begin(key)
                self.state = "value"
            elif mark:
                self._after_params(mark)
        else:  # a value
            text, mark = self.until((VALUE_END, END))
            self.args.add(text)
            if mark:
                self.args.end_value()
                self.state = "params"
                if mark == END:
                    self._after_params(mark)
        return mark is not None  # after a marker, more text may be read

    def _after_params(self, mark: str) -> None:
        if mark == KEY:
            self.state = "key"
        else:
            self.args.close()
            self.state = "text"

    def finish(self) -> None:
        if self.state == "value":
            self.args.end_value()
        if self.state == "name" and self.word.strip():
            self.start_call(self.word.strip())
            self.arguments("{}")
        if self.state in ("params", "key", "before_value", "value"):
            self.args.close()
