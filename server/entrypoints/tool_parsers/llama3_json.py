"""Llama-3.1 / 3.2 / 3.3 JSON tool calls: the whole answer is ``{"name": "f", "parameters": {...}}`` (several
separated by ``;``), after an optional ``<|python_tag|>``. An answer that does not start with ``{`` is content."""

from __future__ import annotations

import json

from server.entrypoints.tool_parsers.base import ParsedTools, ToolParser
from server.entrypoints.tool_parsers.hermes import json_call

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    """A JSON object (or ``;``-separated objects) as the whole answer."""

    name = "llama3_json"
    detect = ("Given the following functions, please respond with a JSON for a function call",)

    def parse(self, text: str, final: bool) -> ParsedTools:
        body = text.lstrip()
        body = body.removeprefix(PYTHON_TAG).lstrip()
        if not body:
            return ParsedTools(text if final else "")
        if PYTHON_TAG.startswith(text.lstrip()) and not final:
            return ParsedTools("")
        if not body.startswith("{"):
            return ParsedTools(text)
        calls, pos, decoder = [], 0, json.JSONDecoder()
        while pos < len(body):
            try:
                obj, end = decoder.raw_decode(body, pos)
            except ValueError:
                call = json_call(body[pos:], closed=final)
                if call:
                    calls.append(call)
                break
            call = json_call(json.dumps(obj), closed=True) if isinstance(obj, dict) else None
            if call is None:
                return ParsedTools(text if final or not calls else "", calls)
            calls.append(call)
            pos = end
            while pos < len(body) and body[pos] in " \n\t;":
                pos += 1
        if final and not calls:
            return ParsedTools(text)
        return ParsedTools("", calls)
