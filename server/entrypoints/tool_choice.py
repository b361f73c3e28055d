"""A chat request's tools and reasoning settings, resolved once per request: the variables the chat template
gets, the JSON schema that ``tool_choice: "required"`` or a named function constrains the output to, and how the
choices' text is read back (:class:`server.entrypoints.chat_output.ChatOutputConfig`).

``required``: the output is a JSON array of at least one call (one with ``parallel_tool_calls: false``), each
``{"name": <a tool's name>, "parameters": <that tool's parameters>}`` (the form vLLM and SGLang constrain to);
a named function: the output is that function's arguments object. Either starts after the reasoning when a
reasoning parser is on and the output starts in the reasoning (``StructuredOutput.after``), and is written on one
line without free whitespace (``StructuredOutput.any_whitespace``) and with integers of at most 18 digits, so that
every sampled token moves the call on and a number ends.
"""

from __future__ import annotations

import json
from typing import Any

from server.entrypoints.chat_output import ChatOutputConfig
from server.entrypoints.protocol import ChatCompletionRequest, NamedToolChoice, Tool, bad_request, check
from server.entrypoints.reasoning_parsers import ReasoningParser
from server.entrypoints.tool_parsers import ToolParser, tool_parser_class
from server.sampling_params import StructuredOutput

ANY_OBJECT: dict[str, Any] = {"type": "object"}
# Integers of a forced call are written with at most 18 digits (what a 64-bit integer holds whatever the digits):
# without a bound a weak model can write digits without end, as nothing but "," or "}" ends a number.
MAX_CALL_INTEGER = 10**18 - 1


def bounded_integers(node: Any) -> Any:
    """A schema (or any part of one) with every ``{"type": "integer"}`` given the bounds it lacks,
    ``-MAX_CALL_INTEGER`` and ``MAX_CALL_INTEGER``."""
    if isinstance(node, list):
        return [bounded_integers(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: bounded_integers(v) for k, v in node.items()}
    if out.get("type") == "integer" and not {"enum", "const"} & set(out):
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -MAX_CALL_INTEGER
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = MAX_CALL_INTEGER
    return out


def tool_parameters(tool: Tool) -> dict[str, Any]:
    """A tool's parameters schema (any object when it declares none)."""
    return tool.function.parameters or ANY_OBJECT


def _rebase_refs(node: Any, base: str) -> Any:
    """``node`` with each local ``$ref`` (``#`` or ``#/...``, relative to the tool's parameters) pointing to the same
    place under ``base``, the JSON pointer where those parameters now sit: a pydantic schema's ``#/$defs/X``."""
    if isinstance(node, list):
        return [_rebase_refs(v, base) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _rebase_refs(v, base) for k, v in node.items()}
    ref = out.get("$ref")
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
        out["$ref"] = base + ref[1:]
    return out


def required_schema(tools: list[Tool], single: bool) -> dict[str, Any]:
    """The schema of ``tool_choice: "required"``'s output: an array of calls of the given tools."""
    calls = [{"type": "object", "properties": {
        "name": {"type": "string", "enum": [t.function.name]},
        "parameters": _rebase_refs(tool_parameters(t), f"#/items/anyOf/{i}/properties/parameters")},
              "required": ["name", "parameters"], "additionalProperties": False} for i, t in enumerate(tools)]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if single:
        schema["maxItems"] = 1
    return schema


def tool_choice_mode(req: ChatCompletionRequest) -> tuple[str, str | None]:
    """``(mode, function name)`` of the request's ``tool_choice``: ``none`` without tools, OpenAI's default
    ``auto`` with them; a named function or ``required`` needs ``tools`` holding it (400 otherwise)."""
    choice, tools = req.tool_choice, req.tools or []
    if isinstance(choice, NamedToolChoice):
        names = [t.function.name for t in tools]
        check(choice.function.name in names, "tool_choice",
              f"'tool_choice' names the function {choice.function.name!r}, which is not in 'tools' "
              f"({', '.join(names) or 'none given'}).")
        return "named", choice.function.name
    if choice == "required":
        check(bool(tools), "tool_choice", "'tool_choice': 'required' needs at least one tool in 'tools'.")
    if choice is None:
        return ("auto" if tools else "none"), None
    return choice, None


def template_variables(req: ChatCompletionRequest) -> dict[str, Any]:
    """What the chat template gets besides the messages: ``tools`` (as Hugging Face passes them), the request's
    ``chat_template_kwargs`` (e.g. ``enable_thinking``) and ``reasoning_effort``."""
    extra: dict[str, Any] = dict(req.chat_template_kwargs or {})
    reserved = {"messages", "add_generation_prompt", "bos_token", "eos_token"} & set(extra)
    if reserved:
        raise bad_request(f"'chat_template_kwargs' may not set {sorted(reserved)[0]!r}: the server sets it.",
                          param="chat_template_kwargs")
    if req.tools:
        extra["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
    if req.reasoning_effort is not None:
        extra.setdefault("reasoning_effort", req.reasoning_effort)
    return extra


def enable_thinking(req: ChatCompletionRequest) -> bool | None:
    """The request's ``enable_thinking`` (or DeepSeek's ``thinking``) template switch, if it sets one."""
    kwargs = req.chat_template_kwargs or {}
    value = kwargs.get("enable_thinking", kwargs.get("thinking"))
    return value if isinstance(value, bool) else None


def output_config(req: ChatCompletionRequest, reasoning: ReasoningParser | None, tools: ToolParser | None,
                  prompt_tail: str, control_tokens: tuple[str, ...]) -> ChatOutputConfig:
    """How the request's choices are read. A tool choice of ``auto`` needs a tool-call parser (400 otherwise, as
    vLLM answers: the server has no way to find the calls)."""
    mode, function = tool_choice_mode(req)
    check(mode != "auto" or tools is not None or not req.tools, "tool_choice",
          "'tool_choice': 'auto' (the default when 'tools' are given) needs a tool-call parser: start the server "
          "with --tool-call-parser (e.g. hermes, or auto to pick by the chat template), or send 'tool_choice': "
          "'required', a named function, or 'none'.")
    if req.separate_reasoning is False:
        reasoning = None
    special = any(p is not None and p.special_tokens for p in (reasoning, tools))
    content_parser = None
    if reasoning is not None and reasoning.content_tool_parser is not None:
        content_parser = tool_parser_class(reasoning.content_tool_parser, None)(None)
    thinking = enable_thinking(req)
    return ChatOutputConfig(
        reasoning=reasoning,
        in_reasoning=reasoning is not None and reasoning.starts_in_reasoning(prompt_tail, thinking),
        may_reason=reasoning is not None and reasoning.may_reason(prompt_tail, thinking),
        tools=tools, content_parser=content_parser, mode=mode, function=function,
        include_reasoning=req.include_reasoning is not False,
        single_call=req.parallel_tool_calls is False, control_tokens=control_tokens if special else ())


def structured_for_tools(req: ChatCompletionRequest, config: ChatOutputConfig) -> StructuredOutput | None:
    """The constraint of ``tool_choice: "required"`` or a named function (None for ``auto`` and ``none``)."""
    if config.mode not in ("required", "named"):
        return None
    tools = req.tools or []
    if config.mode == "named":
        schema = tool_parameters(next(t for t in tools if t.function.name == config.function))
    else:
        schema = required_schema(tools, config.single_call)
    after = config.reasoning.end_marker if config.reasoning is not None and config.may_reason else None
    return StructuredOutput("json", json.dumps(bounded_integers(schema)), after=after, any_whitespace=False)
