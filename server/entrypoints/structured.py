"""Structured-output request fields, as OpenAI, vLLM and SGLang clients send them, mapped onto one
:class:`~server.sampling_params.StructuredOutput`.

- OpenAI: ``response_format`` (``text``, ``json_object``, ``json_schema`` with ``name`` / ``description`` /
  ``schema`` / ``strict``) on chat and completions; the Responses API's ``text.format`` (the same types, flat).
- vLLM: ``structured_outputs`` (``json``, ``regex``, ``choice``, ``grammar``, ``json_object``) and the older
  top-level ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``.
- SGLang: ``json_schema`` / ``regex`` / ``ebnf`` in ``/generate``'s ``sampling_params``.

At most one constraint per request. Each is parsed here, in the HTTP process (a bounded cache keeps the verdict
per spec text), so an invalid schema, regex or grammar is a 400 naming its field and never reaches the engine.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.engine.grammar import check_structured
from server.sampling_params import StructuredOutput


class StructuredOutputError(ValueError):
    """A structured-output field that cannot be used: ``param`` names it (the caller answers a 400)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``. ``strict`` is accepted either way: the schema is always enforced, and
    an object takes only the properties it declares unless ``additionalProperties`` allows more."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format`` of chat and completions."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class TextFormat(BaseModel):
    """The Responses API's ``text.format``: ``response_format`` with the ``json_schema`` fields flat."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextOptions(BaseModel):
    """The Responses API's ``text``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None  # the only value that changes nothing here


class StructuredOutputsParams(BaseModel):
    """vLLM's ``structured_outputs``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    json_: dict[str, Any] | bool | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


def _schema_text(schema: Any, param: str) -> str:
    """A JSON schema (an object, a bool, or JSON text of one) as JSON text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise StructuredOutputError(param, f"'{param}' is not valid JSON ({e}).") from None
    if not isinstance(schema, (dict, bool)):
        raise StructuredOutputError(param, f"'{param}' must be a JSON schema (an object).")
    return json.dumps(schema)


def checked(kind: str, spec: str, param: str) -> StructuredOutput:
    """The constraint, or :class:`StructuredOutputError` naming ``param`` when it is not valid."""
    try:
        so = StructuredOutput(kind, spec)
    except ValidationError as e:
        raise StructuredOutputError(param, f"Invalid value for '{param}': "
                                           f"{e.errors()[0]['msg'].removeprefix('Value error, ')}.") from None
    error = check_structured(so)
    if error is not None:
        what = {"json": "JSON schema", "regex": "regular expression", "grammar": "grammar"}.get(kind, "constraint")
        raise StructuredOutputError(param, f"Invalid {what} in '{param}': {error}")
    return so


def _one(found: list[tuple[str, str, str]]) -> StructuredOutput | None:
    """The single constraint among ``(kind, spec, param)`` candidates; two or more are refused."""
    if len(found) > 1:
        names = ", ".join(f"'{p}'" for _, _, p in found)
        raise StructuredOutputError(found[1][2], f"Give at most one structured-output constraint; got {names}.")
    return checked(*found[0]) if found else None


def _format(kind: str, schema: Any, param: str) -> list[tuple[str, str, str]]:
    if kind == "text":
        return []
    if kind == "json_object":
        return [("json_object", "", param)]
    if schema is None:
        raise StructuredOutputError(f"{param}.schema", f"'{param}.schema' is required for a 'json_schema' format.")
    return [("json", _schema_text(schema, f"{param}.schema"), f"{param}.schema")]


def response_format_constraints(rf: ResponseFormat | None) -> list[tuple[str, str, str]]:
    if rf is None:
        return []
    if rf.type == "json_schema" and rf.json_schema is None:
        raise StructuredOutputError("response_format.json_schema",
                                    "'response_format.json_schema' is required when its type is 'json_schema'.")
    schema = rf.json_schema.schema_ if rf.json_schema is not None else None
    return _format(rf.type, schema, "response_format.json_schema")


def vllm_constraints(so: StructuredOutputsParams | None, guided: dict[str, Any]) -> list[tuple[str, str, str]]:
    """vLLM's ``structured_outputs`` and its older ``guided_*`` fields (``guided`` by field name)."""
    found = []
    if so is not None:
        if so.json_ is not None:
            found.append(("json", _schema_text(so.json_, "structured_outputs.json"), "structured_outputs.json"))
        if so.regex is not None:
            found.append(("regex", so.regex, "structured_outputs.regex"))
        if so.choice is not None:
            found.append(("choice", json.dumps(so.choice), "structured_outputs.choice"))
        if so.grammar is not None:
            found.append(("grammar", so.grammar, "structured_outputs.grammar"))
        if so.json_object:
            found.append(("json_object", "", "structured_outputs.json_object"))
    if guided.get("guided_json") is not None:
        found.append(("json", _schema_text(guided["guided_json"], "guided_json"), "guided_json"))
    for name, kind in (("guided_regex", "regex"), ("guided_grammar", "grammar")):
        if guided.get(name) is not None:
            found.append((kind, guided[name], name))
    if guided.get("guided_choice") is not None:
        found.append(("choice", json.dumps(guided["guided_choice"]), "guided_choice"))
    return found


def openai_structured_output(response_format: ResponseFormat | None, structured_outputs: StructuredOutputsParams |
                             None, guided: dict[str, Any]) -> StructuredOutput | None:
    """The constraint of a chat or completions request (``response_format``, vLLM's fields)."""
    return _one(response_format_constraints(response_format) + vllm_constraints(structured_outputs, guided))


def text_format_structured_output(text: TextOptions | None) -> StructuredOutput | None:
    """The constraint of a Responses API request (``text.format``)."""
    if text is None or text.format is None:
        return None
    return _one(_format(text.format.type, text.format.schema_, "text.format"))


def sglang_structured_output(json_schema: str | None, regex: str | None, ebnf: str | None) -> StructuredOutput | None:
    """The constraint of ``/generate``'s ``sampling_params`` (SGLang's ``json_schema`` is JSON text)."""
    found = []
    if json_schema is not None:
        found.append(("json", _schema_text(json_schema, "sampling_params.json_schema"), "sampling_params.json_schema"))
    if regex is not None:
        found.append(("regex", regex, "sampling_params.regex"))
    if ebnf is not None:
        found.append(("grammar", ebnf, "sampling_params.ebnf"))
    return _one(found)
