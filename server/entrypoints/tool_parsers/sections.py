"""Formats whose calls sit in one section between special tokens, each call a head (naming the function) and
JSON arguments between markers (DeepSeek-V3 / V3.1, Kimi-K2)."""

from __future__ import annotations

from server.entrypoints.tool_parsers.base import ToolParser
from server.entrypoints.tool_parsers.values import RawArguments


class SectionToolParser(ToolParser):
    """``section_begin`` (``call_begin`` HEAD ``head_end`` ARGUMENTS ``call_end``)* ``section_end``; subclasses
    read the head (:meth:`call_head`) and may set ``fence``, text around the arguments that is not part of them."""

    section_begin = section_end = call_begin = call_end = head_end = ""
    fence: tuple[str, str] | None = None
    special_tokens = True

    def __init__(self, tools: list[dict] | None = None):
        super().__init__(tools)
        self.head = ""
        self.args: RawArguments | None = None

    def call_head(self, head: str) -> tuple[str, str | None] | None:
        """``(name, the model's call id or None)`` of a call's head; None when it names no function."""
        raise NotImplementedError

    def step(self) -> bool:
        state = self.state
        if state == "text":
            text, mark = self.until((self.section_begin,))
            self.content(text)
            self.state = "section" if mark else state
        elif state == "section":  # between calls
            _, mark = self.until((self.call_begin, self.section_end))
            self.state = {self.call_begin: "head", self.section_end: "text"}.get(mark, state)
        elif state == "head":
            text, mark = self.until((self.head_end, self.call_end, self.section_end))
            self.head += text
            if mark == self.head_end and not self.head.strip():
                self.head = ""  # whitespace before the head
            elif mark:
                head, self.head = self.call_head(self.head), ""
                if head is not None:
                    self.start_call(*head)
                    self.args = RawArguments(self, self.fence)
                if mark == self.head_end and head is not None:
                    self.state = "arguments"
                else:
                    self._end_call(mark)
        else:
            text, mark = self.until((self.call_end, self.section_end))
            self.args.add(text)
            if mark:
                self._end_call(mark)
        return mark is not None  # after a marker, more text may be read

    def _end_call(self, mark: str) -> None:
        if self.args is not None:
            self.args.end()
            self.args = None
        self.state = "text" if mark == self.section_end else "section"

    def finish(self) -> None:
        if self.state == "head" and self.head:
            head, self.head = self.call_head(self.head), ""
            if head is not None:
                self.start_call(*head)
        elif self.args is not None:
            self.args.end()
