"""GLM-4.5 / GLM-4.6 tool calls: ``<tool_call>NAME\\n<arg_key>KEY</arg_key>\\n<arg_value>VALUE</arg_value>\\n...
</tool_call>``. The template writes strings bare and other values as JSON, so values are read by the schema's
type."""

from __future__ import annotations

import re

from server.entrypoints.tool_parsers.base import (
    ParsedCall,
    RegionToolParser,
    json_arguments,
    param_types,
    typed_value,
)

ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)


class Glm45ToolParser(RegionToolParser):
    """``<tool_call>NAME<arg_key>...`` regions (GLM-4.5, GLM-4.6)."""

    name = "glm45"
    begin, end = "<tool_call>", "</tool_call>"
    markers = (begin,)
    detect = ("<arg_key>",)

    def calls_in(self, body: str, closed: bool) -> list[ParsedCall]:
        cut = min((i for i in (body.find("\n"), body.find("<arg_key>")) if i >= 0), default=-1)
        if cut < 0 and not closed:
            return []  # the name may still grow
        name = (body if cut < 0 else body[:cut]).strip()
        if not name:
            return []
        if not closed:
            return [ParsedCall(name)]
        types = param_types(self.tools, name)
        args = {k.strip(): typed_value(v, types.get(k.strip())) for k, v in ARG.findall(body)}
        return [ParsedCall(name, json_arguments(args))]
