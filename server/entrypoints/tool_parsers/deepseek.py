"""DeepSeek tool calls, a section of calls between special tokens.

- ``deepseek_v3`` (V3, R1-0528): ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n
  {ARGS}\\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>``
- ``deepseek_v31`` (V3.1, V3.2): ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{ARGS}
  <｜tool▁call▁end｜>...<｜tool▁calls▁end｜>``
"""

from __future__ import annotations

import json

from server.entrypoints.tool_parsers.base import ParsedCall, RegionToolParser, json_arguments, split_regions

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"


def normalized(args: str) -> str:
    """Arguments text as a JSON object's text when it parses (the model may add spaces), else as written."""
    try:
        return json_arguments(json.loads(args))
    except ValueError:
        return args.strip()


class DeepSeekV3ToolParser(RegionToolParser):
    """The V3 form: ``function<｜tool▁sep｜>NAME`` then the arguments in a fenced json block."""

    name = "deepseek_v3"
    begin, end = CALLS_BEGIN, CALLS_END
    markers = (CALLS_BEGIN,)
    detect = ("<｜tool▁sep｜>", "```json")
    special_tokens = True

    def calls_in(self, body: str, closed: bool) -> list[ParsedCall]:
        _, calls = split_regions(body, CALL_BEGIN, CALL_END, final=True)
        out = []
        for call, call_closed in calls:
            head, sep, rest = call.partition(SEP)
            name, newline, args = rest.partition("\n")
            if not sep or (not newline and not call_closed and not closed):
                continue
            if not call_closed and not closed:
                out.append(ParsedCall(name.strip()))
                continue
            args = args.strip().removeprefix("```json").removesuffix("```")
            out.append(ParsedCall(name.strip(), normalized(args)))
        return out


class DeepSeekV31ToolParser(RegionToolParser):
    """The V3.1 form: ``NAME<｜tool▁sep｜>ARGS``."""

    name = "deepseek_v31"
    begin, end = CALLS_BEGIN, CALLS_END
    markers = (CALLS_BEGIN,)
    detect = ("<｜tool▁sep｜>",)
    special_tokens = True

    def calls_in(self, body: str, closed: bool) -> list[ParsedCall]:
        _, calls = split_regions(body, CALL_BEGIN, CALL_END, final=True)
        out = []
        for call, call_closed in calls:
            name, sep, args = call.partition(SEP)
            if not sep:
                continue
            done = call_closed or closed
            out.append(ParsedCall(name.strip(), normalized(args) if done else None))
        return out
