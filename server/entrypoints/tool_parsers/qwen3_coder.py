"""Qwen3-Coder's XML tool calls: ``<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n...
</function>\\n</tool_call>``. Values are bare text, read as the type the tool's schema gives them; the newline the
template writes on each side of a value is not part of it."""

from __future__ import annotations

from server.entrypoints.tool_parsers.base import ToolParser, param_types
from server.entrypoints.tool_parsers.values import BareArguments

BEGIN, END = "<tool_call>", "</tool_call>"
FUNCTION, FUNCTION_END, PARAMETER, PARAMETER_END = "<function=", "</function>", "<parameter=", "</parameter>"


class Qwen3CoderToolParser(ToolParser):
    """``<tool_call><function=...>`` regions (Qwen3-Coder, Qwen3-Next)."""

    name = "qwen3_coder"
    detect = ("<function=", "<parameter=")

    def __init__(self, tools: list[dict] | None = None):
        super().__init__(tools)
        self.args: BareArguments | None = None
        self.word = ""  # a name or key being read

    def step(self) -> bool:
        state = self.state
        if state == "text":
            text, mark = self.until((BEGIN,))
            self.content(text)
            self.state = "region" if mark else state
        elif state == "region":  # before the function
            _, mark = self.until((FUNCTION, END))
            self.state = {FUNCTION: "name", END: "text"}.get(mark, state)
        elif state in ("name", "key"):
            text, mark = self.until((">",))
            self.word += text
            if mark:
                word, self.word = self.word.strip(), ""
                if state == "name":
                    self.start_call(word)
                    self.args = BareArguments(self, param_types(self.tools, word), "one")
                else:
                    self.args.begin(word)
                self.state = "params" if state == "name" else "value"
        elif state == "params":
            _, mark = self.until((PARAMETER, FUNCTION_END, END))
            self._after_params(mark)
        else:  # a value
            text, mark = self.until((PARAMETER_END, FUNCTION_END, END))
            self.args.add(text)
            if mark:
                self.args.end_value()
                self.state = "params"
                self._after_params(None if mark == PARAMETER_END else mark)
        return mark is not None  # after a marker, more text may be read

    def _after_params(self, mark: str | None) -> None:
        if mark == PARAMETER:
            self.state = "key"
        elif mark in (FUNCTION_END, END):
            self.args.close()
            self.state = "region" if mark == FUNCTION_END else "text"

    def finish(self) -> None:
        if self.state == "value":
            self.args.end_value()
        if self.state in ("params", "key", "value"):
            self.args.close()
