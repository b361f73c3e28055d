"""JSON grammars token by token over the built-in model's byte-level vocabulary: what the mask allows at a point of
the output, checked against JSON itself (RFC 8259: no raw control character inside a string; whitespace only
between tokens) rather than against the grammar's text."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
import xgrammar as xgr

from server.engine.grammar import structured_grammar, tokenizer_info
from server.models.builtin import builtin_model_path
from server.sampling_params import StructuredOutput
from server.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def vocab():
    tok = Tokenizer.from_pretrained(builtin_model_path())
    return tok, xgr.GrammarCompiler(tokenizer_info(tok, tok.vocab_size, tok.eos_token_ids))


def allowed_after(vocab, so: StructuredOutput, prefix: str) -> list[bytes]:
    """The bytes of every token the grammar allows after ``prefix``."""
    tok, compiler = vocab
    matcher = xgr.GrammarMatcher(compiler.compile_grammar(structured_grammar(so)))
    assert matcher.accept_string(prefix)
    mask = xgr.allocate_token_bitmask(1, tok.vocab_size)
    matcher.fill_next_token_bitmask(mask)
    return [tok.token_bytes(i) for i in range(tok.vocab_size) if (int(mask[0, i // 32]) >> (i % 32)) & 1]


@pytest.mark.parametrize("string", [{"type": "string"}, {"type": "string", "maxLength": 12},
                                    {"type": "string", "minLength": 2, "maxLength": 40}])
@pytest.mark.parametrize("any_whitespace", [True, False])
def test_strings_allow_no_raw_control_characters(vocab, string, any_whitespace):
    so = StructuredOutput("json", json.dumps({"type": "object", "properties": {"city": string},
                                              "required": ["city"]}), any_whitespace=any_whitespace)
    tokens = allowed_after(vocab, so, '{"city": "')
    assert len(tokens) > 100  # most of the vocabulary may start a string
    assert not [t for t in tokens if any(b < 0x20 for b in t)]


def test_compact_json_has_no_whitespace_between_tokens(vocab):
    """``any_whitespace=False`` (forced tool calls): after a value only ``, `` or ``}`` may follow, never a run of
    whitespace, so a model cannot spend its tokens between JSON tokens; free whitespace allows it."""
    schema = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}},
                         "required": ["a", "b"]})
    compact = allowed_after(vocab, StructuredOutput("json", schema, any_whitespace=False), '{"a": 1')
    assert compact and all(t[:1] in (b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"8", b"9", b",") for t in compact)
    assert not [t for t in compact if t[:1].isspace()]
    free = allowed_after(vocab, StructuredOutput("json", schema), '{"a": 1')
    assert [t for t in free if t[:1].isspace()]


FORECAST = {"type": "function", "function": {"name": "forecast", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 14},
                                     "station": {"type": "integer"}, "hourly": {"type": "boolean"}},
    "required": ["city", "days", "station"], "additionalProperties": False}}}
PICK = {"type": "function", "function": {"name": "pick", "parameters": {
    "type": "object", "properties": {"metric": {"type": "boolean"}}, "required": ["metric"]}}}


def random_walk(vocab, so: StructuredOutput, seed: int, max_tokens: int) -> tuple[str | None, int]:
    """An output under the grammar with each token drawn uniformly from those the mask allows: the text and the
    tokens it took if the grammar ended within ``max_tokens``, else None."""
    tok, compiler = vocab
    matcher = xgr.GrammarMatcher(compiler.compile_grammar(structured_grammar(so)))
    mask = xgr.allocate_token_bitmask(1, tok.vocab_size)
    gen = torch.Generator().manual_seed(seed)
    ids = []
    for _ in range(max_tokens):
        matcher.fill_next_token_bitmask(mask)
        bits = (mask[0].unsqueeze(1) >> torch.arange(32, dtype=torch.int32)) & 1  # word i, bit j: token 32 i + j
        allowed = torch.nonzero(bits.flatten()[: tok.vocab_size]).flatten()
        token = int(allowed[torch.randint(len(allowed), (1,), generator=gen)])
        assert matcher.accept_token(token)
        if matcher.is_terminated():
            return b"".join(tok.token_bytes(t) for t in ids).decode(), len(ids)
        ids.append(token)
    return None, max_tokens


def test_forced_call_grammars_end_under_random_sampling(vocab):
    """The grammars of ``tool_choice`` (required with one call, and a named function; an enum, integers with and
    without bounds, a boolean) with tokens drawn uniformly from the mask, 100 seeds each: every
    walk ends within 160 tokens and its JSON validates against the tools' parameters."""
    from server.entrypoints.protocol import Tool
    from server.entrypoints.tool_choice import bounded_integers, required_schema

    tools = [Tool.model_validate(t) for t in (FORECAST, PICK)]
    for schema in (required_schema(tools, single=True), FORECAST["function"]["parameters"]):
        so = StructuredOutput("json", json.dumps(bounded_integers(schema)), any_whitespace=False)
        for seed in range(100):
            text, _ = random_walk(vocab, so, seed, 160)
            assert text is not None, seed
            jsonschema.validate(json.loads(text), schema)
