"""Structured outputs: grammars of :class:`~server.sampling_params.StructuredOutput` constraints (xgrammar), one
matcher per constrained request on rank 0, and the token bitmask of a step's constrained rows.

A constraint becomes an xgrammar ``Grammar`` (:func:`structured_grammar`, no vocabulary needed: the HTTP process
checks requests with it), then, in the engine, a grammar compiled against the model's vocabulary (cached by its
text, compiled in a background thread while the request's prompt is prefilled). Each step the engine asks
:class:`GrammarMasks` for the bitmask of the rows it is about to sample, after the previous step's tokens advanced
the matchers, and the sampler applies it to the logits on the device
(:func:`server.layers.sampler.apply_token_bitmask`); the matcher then advances by the sampled token and reports
when the grammar has ended (its stop token accepted). See docs/architecture.md, "Structured outputs".
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

try:
    import xgrammar as xgr
except ImportError:  # an engine without it serves everything but structured outputs (refused, saying why)
    xgr = None

from server.layers.sampler import TokenMask
from server.sampling_params import StructuredOutput

# Whitespace characters allowed between JSON tokens: enough to indent a few levels, and a bound on the runs of
# newlines a weak model can loop in when any whitespace is allowed.
MAX_JSON_WHITESPACE = 32
COMPILED_CACHE_SIZE = 256  # compiled grammars kept by the engine, least recently used dropped first
# Threads that fill a step's bitmask rows (xgrammar's batch fill, outside the GIL): a row of a large vocabulary
# takes up to a millisecond, and the rows must be ready before the forward they overlap with ends.
FILL_THREADS = max(1, min(8, (os.cpu_count() or 2) // 2))
_XGR_LOCATION = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")  # xgrammar's "[time] file.cc:line: " error prefix


def _xgrammar_message(e: Exception) -> str:
    return _XGR_LOCATION.sub("", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)


def _choices(spec: str) -> list[str]:
    try:
        options = json.loads(spec)
    except json.JSONDecodeError as e:
        raise ValueError(f"a choice constraint is a JSON list of strings ({e})") from None
    if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
        raise ValueError("a choice constraint is a non-empty list of strings")
    return options


def require_xgrammar() -> None:
    """Raise ``ValueError`` (a 400 over HTTP) when the xgrammar package is missing."""
    if xgr is None:
        raise ValueError("structured outputs need the xgrammar package on the server (pip install xgrammar)")


def structured_grammar(so: StructuredOutput) -> xgr.Grammar:
    """The grammar of ``so``; ``ValueError`` saying what is wrong with an invalid schema, regex or grammar."""
    require_xgrammar()
    try:
        if so.kind in ("json", "json_object"):
            # json_object: strict_mode off, so any properties (strict mode would allow only those the schema
            # declares: none)
            schema, strict = (valid_json_strings(so.spec), True) if so.kind == "json" else ('{"type": "object"}', False)
            return xgr.Grammar.from_json_schema(schema, strict_mode=strict, **json_whitespace(so.any_whitespace))
        if so.kind == "regex":
            return xgr.Grammar.from_regex(so.spec)
        if so.kind == "choice":
            # json.dumps escapes quotes, backslashes and control characters as the EBNF string literals read them
            options = _choices(so.spec)
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(o) for o in options))
        return xgr.Grammar.from_ebnf(so.spec)
    except ValueError:
        raise
    except Exception as e:  # xgrammar raises RuntimeError from its parsers
        raise ValueError(_xgrammar_message(e)) from None


# Schema keywords that xgrammar (0.2.x) parses and then does not enforce: a schema using one is refused (400) rather
# than answered with output that breaks it. ``format`` values it enforces are in XGRAMMAR_FORMATS; ``oneOf`` is
# enforced as ``anyOf`` (exact when the branches are disjoint, as discriminated unions are).
UNENFORCED_KEYWORDS = ("allOf", "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
                       "uniqueItems", "multipleOf", "minContains", "maxContains", "unevaluatedItems")
XGRAMMAR_FORMATS = ("email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid", "uri",
                    "uri-reference", "uri-template", "json-pointer", "relative-json-pointer")
_ANNOTATIONS = {"title", "description", "default", "examples", "deprecated", "readOnly", "writeOnly", "$comment",
                "$defs", "definitions", "$schema", "$id"}
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")  # name -> schema
_SCHEMA_VALUED = ("items", "prefixItems", "additionalProperties", "propertyNames", "contains", "additionalItems",
                  "unevaluatedProperties", "anyOf", "oneOf")  # a schema or a list of schemas


def _length(value: Any) -> int | None:
    """A ``minLength`` / ``maxLength`` value, or None when it is absent or not an integer."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _is_string_schema(node: dict) -> bool:
    t = node.get("type")
    return t == "string" or (isinstance(t, list) and "string" in t)


def _prepare_schema(node: Any, path: str = "") -> Any:
    """``node`` (a schema, or any part of one) as xgrammar gets it; ``ValueError`` naming the first keyword (and
    where it is) that xgrammar would not enforce.

    - A one-element ``allOf`` (pydantic's way of giving a ``$ref`` a description) is its element.
    - A string bounded by ``minLength`` / ``maxLength`` alone becomes the pattern ``^.{min,max}$``: xgrammar writes
      such a string as characters of ``[^"\\\r\n]``, which lets raw control characters (``\x06``, a tab) through,
      and no JSON parser reads those; the pattern excludes them (xgrammar issue 800)."""
    if isinstance(node, list):
        return [_prepare_schema(v, f"{path}/{i}") for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    one = node.get("allOf")
    if isinstance(one, list) and len(one) == 1 and isinstance(one[0], dict) \
            and set(node) - {"allOf"} <= _ANNOTATIONS:
        node = {**{k: v for k, v in node.items() if k != "allOf"}, **one[0]}
    for key in UNENFORCED_KEYWORDS:
        value = node.get(key)
        if key in node and not (key == "uniqueItems" and value is False) \
                and not (key == "multipleOf" and value == 1 and node.get("type") == "integer"):
            raise ValueError(f"the JSON schema keyword {key!r} (at {path or '/'}) is not supported: structured outputs "
                             "would not enforce it")
    fmt = node.get("format")
    if fmt is not None and _is_string_schema(node) and fmt not in XGRAMMAR_FORMATS:
        raise ValueError(f"the string format {fmt!r} (at {path or '/'}) is not supported; supported: "
                         + ", ".join(XGRAMMAR_FORMATS))
    bounded = any(_length(node.get(k)) is not None for k in ("minLength", "maxLength"))
    if bounded and _is_string_schema(node) and ({"pattern", "format"} & set(node)):
        raise ValueError(f"minLength / maxLength together with {'pattern' if 'pattern' in node else 'format'} "
                         f"(at {path or '/'}) is not supported: structured outputs would enforce only the "
                         f"{'pattern' if 'pattern' in node else 'format'}; write the length into the pattern")
    out = {}
    for k, v in node.items():
        if k in _SCHEMA_MAPS and isinstance(v, dict):
            out[k] = {name: _prepare_schema(sub, f"{path}/{k}/{name}") for name, sub in v.items()}
        elif k in _SCHEMA_VALUED:
            out[k] = _prepare_schema(v, f"{path}/{k}")
        else:
            out[k] = v
    if bounded and _is_string_schema(out) and not {"enum", "const"} & set(out):
        low, high = (_length(out.pop(k, None)) for k in ("minLength", "maxLength"))
        out["pattern"] = f"^.{{{low or 0},{'' if high is None else high}}}$"
    return out


def valid_json_strings(spec: str) -> str:
    """A JSON schema's text as xgrammar gets it (:func:`_prepare_schema`): every string it allows is valid JSON, and
    a keyword xgrammar would not enforce is a ``ValueError``."""
    try:
        schema = json.loads(spec)
    except ValueError:
        return spec  # xgrammar says what is wrong with it
    return json.dumps(_prepare_schema(schema))


def json_whitespace(any_whitespace: bool) -> dict:
    """xgrammar's whitespace options: free runs of at most ``MAX_JSON_WHITESPACE`` characters, or none at all
    (one line, ``json.dumps``'s separators ``", "`` and ``": "``). Without free whitespace a weak or random model
    cannot spend its tokens between JSON tokens: every token it samples moves the value forward."""
    if any_whitespace:
        return {"max_whitespace_cnt": MAX_JSON_WHITESPACE}
    return {"any_whitespace": False, "separators": (", ", ": ")}


def checked_grammar(so: StructuredOutput) -> xgr.Grammar:
    """:func:`structured_grammar`, and ``ValueError`` too for a constraint no text can start (an empty language)."""
    grammar = structured_grammar(so)
    if not _admits_a_first_byte(grammar):
        raise ValueError("the constraint matches no text: no character can start the output")
    return grammar


@lru_cache(maxsize=512)
def check_structured(so: StructuredOutput) -> str | None:
    """Why ``so`` is invalid, or None; cached, so a client repeating a schema pays for its parse once."""
    try:
        checked_grammar(so)
    except ValueError as e:
        return str(e)
    return None


@lru_cache(maxsize=1)
def _byte_compiler() -> xgr.GrammarCompiler:
    """A compiler over a vocabulary of the 256 bytes and a stop token: what a grammar allows first, whatever the
    model's tokenizer."""
    vocab = [f"<0x{i:02X}>" for i in range(256)] + ["</s>"]
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.BYTE_FALLBACK, stop_token_ids=[256])
    return xgr.GrammarCompiler(info, max_threads=1)


def _admits_a_first_byte(grammar: xgr.Grammar) -> bool:
    """Whether the output can start (or end at once): False for a constraint whose language is empty from the
    start, such as the regex ``[^\x00-\U0010FFFF]``, which no token could satisfy."""
    matcher = xgr.GrammarMatcher(_byte_compiler().compile_grammar(grammar))
    mask = xgr.allocate_token_bitmask(1, 257)
    matcher.fill_next_token_bitmask(mask)
    return bool(mask.any())


def tokenizer_info(tokenizer, vocab_size: int, stop_ids: list[int]) -> xgr.TokenizerInfo:
    """xgrammar's view of the vocabulary of ``tokenizer`` (:class:`server.tokenizer.Tokenizer`), padded to the
    model's ``vocab_size`` (padding ids are never allowed). Special tokens are left out as text (an empty
    encoding), so a grammar never lets a control token spell part of the output; ``stop_ids`` end a grammar."""
    backend = tokenizer.backend
    encoded = [""] * min(tokenizer.vocab_size, vocab_size)
    for token, i in backend.get_vocab(with_added_tokens=True).items():
        if i < len(encoded):
            encoded[i] = token
    for i, added in backend.get_added_tokens_decoder().items():
        if added.special and i < len(encoded):
            encoded[i] = ""
    # vocab type (byte-level, byte-fallback, raw) and prefix space, as xgrammar reads them from tokenizer.json
    meta = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
    return xgr.TokenizerInfo(encoded, meta["vocab_type"], vocab_size=vocab_size, stop_token_ids=stop_ids,
                             add_prefix_space=meta["add_prefix_space"])


@dataclass
class _Constraint:
    """One request's constraint: its grammar (being compiled), whether the output is constrained yet (at once, or
    after the ``after`` marker; ``tail`` holds the last output bytes while the marker is looked for), and its
    matcher, made when first needed."""

    grammar: Future[xgr.CompiledGrammar]
    stop_ids: list[int]
    after: bytes | None
    active: bool
    matcher: xgr.GrammarMatcher | None = None
    tail: bytes = b""


class GrammarMasks:
    """The constraints of the running requests on rank 0, by request id: compile at admission, the step's bitmask
    of the constrained rows, advance by each sampled token. The vocabulary is read on the first constrained
    request, so an engine that never sees one pays nothing. Grammars compile in one background thread (xgrammar's
    compiler uses its own threads too), so a new schema does not stall the running requests' steps; a request
    waits for its grammar only if its prompt was prefilled before the compilation ended."""

    def __init__(self, tokenizer_path: str, vocab_size: int, eos_ids: list[int], max_rows: int,
                 device: torch.device):
        self.tokenizer_path, self.vocab_size, self.eos_ids = tokenizer_path, vocab_size, eos_ids
        self.max_rows, self.device = max_rows, device
        self.constraints: dict[str, _Constraint] = {}
        self._dead: set[str] = set()  # requests whose grammar reached a dead end (see mask)
        self._tokenizer = None
        self._compiler: xgr.GrammarCompiler | None = None
        # by (kind, spec, any_whitespace)
        self._compiled: OrderedDict[tuple[str, str, bool], Future[xgr.CompiledGrammar]] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._filler: xgr.BatchGrammarMatcher | None = None
        self._host: torch.Tensor | None = None  # bitmask staging rows (pinned on CUDA), one per running request
        self._device_mask: torch.Tensor | None = None

    def _start(self) -> None:
        from server.tokenizer import Tokenizer

        require_xgrammar()
        try:
            self._tokenizer = Tokenizer.from_pretrained(self.tokenizer_path)
        except (ValueError, OSError) as e:
            raise ValueError(f"structured outputs need the model's tokenizer: {e}") from None
        if not self.eos_ids:
            raise ValueError("structured outputs need an end-of-sequence token: the model names none")
        info = tokenizer_info(self._tokenizer, self.vocab_size, self.eos_ids)
        self._compiler = xgr.GrammarCompiler(info, max_threads=4)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
        self._filler = xgr.BatchGrammarMatcher(FILL_THREADS)
        words = xgr.get_bitmask_shape(1, self.vocab_size)[1]
        self._host = torch.zeros(self.max_rows, words, dtype=torch.int32,
                                 pin_memory=self.device.type == "cuda")
        self._device_mask = torch.zeros(self.max_rows, words, dtype=torch.int32, device=self.device)

    def add(self, rid: str, so: StructuredOutput, stop_token_ids: list[int]) -> None:
        """Start compiling ``so`` for request ``rid`` (``ValueError`` at once if it is invalid); ``stop_token_ids``
        end it too."""
        stop_ids = list(dict.fromkeys([*self.eos_ids, *stop_token_ids]))
        after = so.after.encode() if so.after else None
        self.constraints[rid] = _Constraint(self._compile(so), stop_ids, after, active=after is None)

    def _compile(self, so: StructuredOutput) -> Future[xgr.CompiledGrammar]:
        """``so``'s grammar compiled against the vocabulary (a future), cached by its text."""
        if self._compiler is None:
            self._start()
        key = (so.kind, so.spec, so.any_whitespace)
        grammar = self._compiled.get(key)
        if grammar is None:
            parsed = checked_grammar(so)  # parsed here: an invalid spec is refused at admission
            grammar = self._compiled[key] = self._pool.submit(self._compiler.compile_grammar, parsed)
            if len(self._compiled) > COMPILED_CACHE_SIZE:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(key)
        return grammar

    @staticmethod
    def _matcher(c: _Constraint) -> xgr.GrammarMatcher:
        if c.matcher is None:
            c.matcher = xgr.GrammarMatcher(c.grammar.result(), override_stop_tokens=c.stop_ids)
        return c.matcher

    def drop(self, rid: str) -> None:
        self.constraints.pop(rid, None)
        self._dead.discard(rid)

    def constrained(self, rid: str) -> bool:
        """Whether ``rid``'s next token is masked (it has a constraint, and its ``after`` marker, if any, was
        generated)."""
        c = self.constraints.get(rid)
        return c is not None and c.active

    def token_mask(self, rids: list[str]) -> TokenMask | None:
        """The bitmask of the constrained rows among ``rids`` (a step's sampled requests, in row order), on the
        device; None, with no work, when none is constrained. The host rows are filled from the matchers, which the
        previous step's tokens have advanced, and copied without a wait; the staging rows are rewritten only after
        the previous step's tokens were read, which came after this copy in stream order."""
        if not self.constraints:
            return None
        rows = [i for i, rid in enumerate(rids) if self.constrained(rid)]
        if not rows:
            return None
        matchers = [self._matcher(self.constraints[rids[i]]) for i in rows]
        self._filler.batch_fill_next_token_bitmask(matchers, self._host)
        n = len(rows)
        for j in (~self._host[:n].any(dim=1)).nonzero().flatten().tolist():
            # a dead end (a grammar that matches no text past this point): the row may sample only a stop token,
            # which accept() then refuses, ending the request with an error that says so instead of sampling
            # from an all -inf row
            self._dead.add(rids[rows[j]])
            for t in self.constraints[rids[rows[j]]].stop_ids:
                word, bit = divmod(t, 32)
                self._host[j, word] |= (1 << bit) - (1 << 32 if bit == 31 else 0)
        dev = self._device_mask[:n]
        dev.copy_(self._host[:n], non_blocking=True)
        return TokenMask(rows, dev)

    def accept(self, rid: str, token: int) -> bool:
        """Advance ``rid``'s constraint by its sampled ``token``; True when the grammar has ended (its stop token
        accepted). A token the grammar refuses raises ``ValueError`` (the mask makes that impossible)."""
        c = self.constraints.get(rid)
        if c is None:
            return False
        if not c.active:
            self._look_for_marker(c, token)
            return False
        if rid in self._dead:
            raise ValueError("the structured output's constraint matches no text: no token can continue the output "
                             "generated so far")
        matcher = self._matcher(c)
        if not matcher.accept_token(token):
            raise ValueError(f"token {token} does not continue the structured output")
        return matcher.is_terminated()

    def _look_for_marker(self, c: _Constraint, token: int) -> None:
        """Free output until the bytes of ``c.after`` have been generated (however they were tokenized); the
        constraint starts with the next token."""
        text = c.tail + self._tokenizer.token_bytes(token)
        if c.after in text:
            c.active, c.tail = True, b""
        else:
            c.tail = text[-(len(c.after) - 1):] if len(c.after) > 1 else b""
