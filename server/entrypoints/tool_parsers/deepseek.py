"""DeepSeek tool calls, a section of calls between special tokens.

- ``deepseek_v3`` (V3, R1-0528): ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n
  {ARGS}\\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>``
- ``deepseek_v31`` (V3.1, V3.2): ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{ARGS}
  <｜tool▁call▁end｜>...<｜tool▁calls▁end｜>``
"""

from __future__ import annotations

from server.entrypoints.tool_parsers.sections import SectionToolParser

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"


class DeepSeekV3ToolParser(SectionToolParser):
    """The V3 form: ``function<｜tool▁sep｜>NAME`` then the arguments in a fenced json block."""

    name = "deepseek_v3"
    detect = ("<｜tool▁sep｜>", "```json")
    section_begin, section_end, call_begin, call_end, head_end = CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, "\n"
    fence = ("```json", "```")

    def call_head(self, head: str) -> tuple[str, str | None] | None:
        _, sep, name = head.partition(SEP)
        return (name.strip(), None) if sep and name.strip() else None


class DeepSeekV31ToolParser(SectionToolParser):
    """The V3.1 form: ``NAME<｜tool▁sep｜>ARGS``."""

    name = "deepseek_v31"
    detect = ("<｜tool▁sep｜>",)
    section_begin, section_end, call_begin, call_end, head_end = CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP

    def call_head(self, head: str) -> tuple[str, str | None] | None:
        return (head.strip(), None) if head.strip() else None
