"""Structured-output cases the engine and server tests share: a battery of JSON schemas, regexes, choices and EBNF
grammars, each with a checker written independently of the code under test (``jsonschema``, Python's ``re``), and
a checkpoint with a real tokenizer for them.

Random weights generate long free text (a closing quote is one token of thousands), so the requests bias the
tokens that close strings, arrays and objects: the grammar masks still decide what is allowed, the bias only makes
outputs end within a test's token budget.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import jsonschema

from server.models.builtin import builtin_model_path
from server.sampling_params import StructuredOutput
from server.tokenizer import Tokenizer
from tests.helpers import save_tiny_model

PADDED_VOCAB = 2080  # the builtin tokenizer has 2048 tokens: the model's head is larger, as many real models'


def structured_checkpoint(root: str) -> str:
    """A tiny random Llama whose vocabulary (padded) is the builtin model's tokenizer's, with its tokenizer files."""
    path = save_tiny_model("llama", root, vocab_size=PADDED_VOCAB, max_position_embeddings=4096, eos_token_id=2)
    src = builtin_model_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(os.path.join(src, name), os.path.join(path, name))
    return path


def closing_bias(tokenizer: Tokenizer, value: float = 6.0) -> dict[int, float]:
    """A logit bias toward EOS and the tokens made only of closing punctuation (``"``, ``}``, ``]``, ``,``), and
    against whitespace-only tokens."""
    bias = {i: value for i in tokenizer.eos_token_ids}
    for i in range(tokenizer.vocab_size):
        text = tokenizer.token_bytes(i)
        if text and all(c in b'"}],' for c in text):
            bias[i] = value
        elif text and text.isspace():
            bias[i] = -value
    return bias


S = {"type": "string", "maxLength": 12}  # bounded strings keep outputs short; free strings appear below too
SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"user": {"type": "object", "required": ["id", "email"],
                                               "properties": {"id": {"type": "integer"}, "email": S}}},
     "required": ["user"]},
    {"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer"}, "minItems": 1,
                                             "maxItems": 3}}, "required": ["xs"]},
    {"type": "array", "items": S, "maxItems": 2},
    {"type": "object", "properties": {"v": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "integer"}]}},
     "required": ["v"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}},
     "required": ["code"]},
    {"type": "object", "properties": {"p": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["p"]},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 5}}, "required": ["n"]},
    {"type": "object", "properties": {"a": S, "b": {"type": "integer"}, "c": {"type": "boolean"}}},
    {"type": "boolean"},
    {"type": "null"},
    {"type": "object", "properties": {"kind": {"const": "point"}, "x": {"type": "number"}},
     "required": ["kind", "x"]},
    {"type": "object", "properties": {"a": {"type": "integer"}, "b": S}, "required": ["a"],
     "additionalProperties": False},
    {"type": "array", "items": {"type": "object", "properties": {"k": S, "v": {"type": "integer"}},
                                "required": ["k", "v"]}, "minItems": 1, "maxItems": 2},
    {"type": "array", "items": {"type": "array", "items": {"type": "integer"}, "maxItems": 2}, "minItems": 1,
     "maxItems": 2},
    {"enum": [1, "a", None, True, 2.5]},
    {"type": "string", "minLength": 2, "maxLength": 4},
    {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                      "required": ["x", "y"]}},
     "type": "object", "properties": {"from": {"$ref": "#/$defs/pt"}, "to": {"$ref": "#/$defs/pt"}},
     "required": ["from", "to"]},
    {"oneOf": [{"type": "integer", "minimum": 0, "maximum": 999}, {"type": "boolean"}]},
    {"type": "object", "properties": {"t": {"type": "integer", "minimum": 10, "maximum": 99}},
     "required": ["t"]},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
        "c": {"type": "object", "properties": {"d": {"enum": ["deep"]}}, "required": ["d"]}}, "required": ["c"]}},
        "required": ["b"]}}, "required": ["a"]},
    {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.(com|org)$"},
    {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "boolean"}, {"enum": ["x", "y"]}],
     "items": False},
    {"type": "object", "properties": {"status": {"enum": ["ok", "error"]}, "detail": {"type": "object", "properties": {
        "code": {"type": "integer", "minimum": 100, "maximum": 599}}, "required": ["code"]}},
     "required": ["status", "detail"]},
    {"anyOf": [{"type": "object", "properties": {"cat": {"type": "boolean"}}, "required": ["cat"]},
               {"type": "object", "properties": {"dog": {"type": "integer"}}, "required": ["dog"]}]},
    {"type": "integer", "enum": [3, 5, 7]},
    {"enum": ["say \"hi\"", "back\\slash", "tab\there", "é-ü"]},
    {"type": ["string", "null"], "maxLength": 6},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2,
                                               "maxItems": 3}, "score": {"type": "number"}},
     "required": ["tags", "score"]},
    {"type": "object", "properties": {"free": {"type": "string"}}, "required": ["free"]},
    {"type": "object", "properties": {"x": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}},
     "required": ["x"]},
    {"type": "array", "items": {"type": "number", "minimum": -1, "maximum": 1}, "minItems": 2, "maxItems": 4},
]

REGEXES = [r"[a-z]{3}-\d{2,4}", r"(yes|no|maybe)!", r"\d{4}-\d{2}-\d{2}", r"[A-F0-9]{8}", r"(ab|cd)+x"]
CHOICES = [["yes", "no"], ["alpha", "beta", "gamma \"q\""], ["日本", "x y"]]
# A grammar and the same language as a Python regex (written separately, to check the outputs)
GRAMMARS = [
    ('root ::= expr\nexpr ::= term ("+" term)*\nterm ::= [0-9] | "(" expr ")"', None),
    ('root ::= "<" name ">" [a-z]{1,5} "</" name ">"\nname ::= "b" | "i"', r"<([bi])>[a-z]{1,5}</\1>"),
    ('root ::= item ("," item){0,3}\nitem ::= "on" | "off"', r"(on|off)(,(on|off)){0,3}"),
]


def balanced_expr(text: str) -> bool:
    """Whether ``text`` is in the first grammar's language (digits joined by +, parenthesized), by recursion."""
    pos = 0

    def expr() -> bool:
        nonlocal pos
        if not term():
            return False
        while pos < len(text) and text[pos] == "+":
            pos += 1
            if not term():
                return False
        return True

    def term() -> bool:
        nonlocal pos
        if pos < len(text) and text[pos].isdigit():
            pos += 1
            return True
        if pos < len(text) and text[pos] == "(":
            pos += 1
            if expr() and pos < len(text) and text[pos] == ")":
                pos += 1
                return True
        return False

    return expr() and pos == len(text)


def cases() -> list[tuple[StructuredOutput, object]]:
    """Every case as ``(constraint, check)``: ``check(text)`` raises or returns False when ``text`` violates it."""
    out: list[tuple[StructuredOutput, object]] = []
    for schema in SCHEMAS:
        out.append((StructuredOutput("json", json.dumps(schema)),
                    lambda t, s=schema: jsonschema.validate(json.loads(t), s) is None))
    out.append((StructuredOutput("json_object"), lambda t: isinstance(json.loads(t), dict)))
    for rx in REGEXES:
        out.append((StructuredOutput("regex", rx), lambda t, rx=rx: re.fullmatch(rx, t) is not None))
    for options in CHOICES:
        out.append((StructuredOutput("choice", json.dumps(options)), lambda t, o=options: t in o))
    for grammar, rx in GRAMMARS:
        check = balanced_expr if rx is None else (lambda t, rx=rx: re.fullmatch(rx, t) is not None)
        out.append((StructuredOutput("grammar", grammar), check))
    return out
