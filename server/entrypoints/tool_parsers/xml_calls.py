"""Tool calls written as XML-like elements with bare-text parameter values (Qwen3-Coder, MiniMax-M2): a region
``BEGIN ... END`` holds one or more calls ``CALL NAME NAME_END ... CALL_END``, each a run of parameters
``PARAMETER KEY NAME_END VALUE PARAMETER_END``; values are read as the type the tool's schema gives them. The
formats differ only in their marks and in which newlines around a value are the template's
(:class:`server.entrypoints.tool_parsers.values.BareArguments`)."""

from __future__ import annotations

from server.entrypoints.tool_parsers.base import ToolParser, param_types
from server.entrypoints.tool_parsers.values import BareArguments


class XmlCallsToolParser(ToolParser):
    """The reader of one such format, set by the class attributes of a subclass."""

    BEGIN = END = CALL = CALL_END = PARAMETER = PARAMETER_END = NAME_END = ""
    NEWLINES = "none"  # BareArguments' newlines

    def __init__(self, tools: list[dict] | None = None):
        super().__init__(tools)
        self.args: BareArguments | None = None
        self.word = ""  # a name or key being read

    def step(self) -> bool:
        state = self.state
        if state == "text":
            text, mark = self.until((self.BEGIN,))
            self.content(text)
            self.state = "region" if mark else state
        elif state == "region":  # between calls
            _, mark = self.until((self.CALL, self.END))
            self.state = {self.CALL: "name", self.END: "text"}.get(mark, state)
        elif state in ("name", "key"):
            text, mark = self.until((self.NAME_END,))
            self.word += text
            if mark:
                word, self.word = self.word.strip(), ""
                if state == "name":
                    self.start_call(word)
                    self.args = BareArguments(self, param_types(self.tools, word), self.NEWLINES)
                else:
                    self.args.begin(word)
                self.state = "params" if state == "name" else "value"
        elif state == "params":
            _, mark = self.until((self.PARAMETER, self.CALL_END, self.END))
            self._after_params(mark)
        else:  # a value
            text, mark = self.until((self.PARAMETER_END, self.CALL_END, self.END))
            self.args.add(text)
            if mark:
                self.args.end_value()
                self.state = "params"
                self._after_params(None if mark == self.PARAMETER_END else mark)
        return mark is not None  # after a marker, more text may be read

    def _after_params(self, mark: str | None) -> None:
        if mark == self.PARAMETER:
            self.state = "key"
        elif mark in (self.CALL_END, self.END):
            self.args.close()
            self.state = "region" if mark == self.CALL_END else "text"

    def finish(self) -> None:
        if self.state == "value":
            self.args.end_value()
        if self.state in ("params", "key", "value"):
            self.args.close()
