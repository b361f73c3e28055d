"""MiniMax-M2 tool calls: ``<minimax:tool_call>\\n<invoke name="NAME">\\n<parameter name="KEY">VALUE</parameter>\\n
</invoke>\\n...</minimax:tool_call>``, several invokes per region; values are bare text, read by the schema's
type."""

from __future__ import annotations

from server.entrypoints.tool_parsers.base import ToolParser, param_types
from server.entrypoints.tool_parsers.values import BareArguments

BEGIN, END = "<minimax:tool_call>", "</minimax:tool_call>"
INVOKE, INVOKE_END, PARAMETER, PARAMETER_END = '<invoke name="', "</invoke>", '<parameter name="', "</parameter>"


class MiniMaxM2ToolParser(ToolParser):
    """``<minimax:tool_call>`` regions of ``<invoke>`` elements (MiniMax-M2)."""

    name = "minimax_m2"
    detect = ("<minimax:tool_call>",)

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
        elif state == "region":  # between invokes
            _, mark = self.until((INVOKE, END))
            self.state = {INVOKE: "name", END: "text"}.get(mark, state)
        elif state in ("name", "key"):
            text, mark = self.until(('">',))
            self.word += text
            if mark:
                word, self.word = self.word, ""
                if state == "name":
                    self.start_call(word)
                    self.args = BareArguments(self, param_types(self.tools, word), "all")
                else:
                    self.args.begin(word)
                self.state = "params" if state == "name" else "value"
        elif state == "params":
            _, mark = self.until((PARAMETER, INVOKE_END, END))
            self._after_params(mark)
        else:  # a value
            text, mark = self.until((PARAMETER_END, INVOKE_END, END))
            self.args.add(text)
            if mark:
                self.args.end_value()
                self.state = "params"
                self._after_params(None if mark == PARAMETER_END else mark)
        return mark is not None  # after a marker, more text may be read

    def _after_params(self, mark: str | None) -> None:
        if mark == PARAMETER:
            self.state = "key"
        elif mark in (INVOKE_END, END):
            self.args.close()
            self.state = "region" if mark == INVOKE_END else "text"

    def finish(self) -> None:
        if self.state == "value":
            self.args.end_value()
        if self.state in ("params", "key", "value"):
            self.args.close()
