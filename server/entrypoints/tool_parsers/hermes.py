"""Hermes / Qwen2.5 / Qwen3 tool calls: ``<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>``, one
region per call (the format the Qwen and Hermes chat templates describe to the model)."""

from __future__ import annotations

import json
import re

from server.entrypoints.tool_parsers.base import ParsedCall, RegionToolParser, json_arguments

NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')


def json_call(body: str, closed: bool) -> ParsedCall | None:
    """A call written as a JSON object ``{"name": ..., "arguments" or "parameters": {...}}``: whole once
    ``closed`` (a body that is not such an object keeps its text as the arguments), else its name once known."""
    m = NAME.search(body)
    if not closed:
        return ParsedCall(json.loads(f'"{m.group(1)}"')) if m else None
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("name"), str):
        args = obj.get("arguments", obj.get("parameters", {}))
        return ParsedCall(obj["name"], args if isinstance(args, str) else json_arguments(args))
    return ParsedCall(json.loads(f'"{m.group(1)}"'), body.strip()) if m else None


class HermesToolParser(RegionToolParser):
    """``<tool_call>`` JSON regions (Hermes, Qwen2.5, Qwen3)."""

    name = "hermes"
    begin, end = "<tool_call>", "</tool_call>"
    markers = (begin,)
    detect = ("<tool_call>",)

    def calls_in(self, body: str, closed: bool) -> list[ParsedCall]:
        call = json_call(body.strip(), closed)
        return [call] if call else []
