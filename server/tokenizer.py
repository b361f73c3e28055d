"""Tokenizer of a Hugging Face model directory, and incremental detokenization with stop strings.

Only `tokenizers` and `jinja2` are needed at run time: `tokenizer.json` holds the whole pipeline
(normalizer, pre-tokenizer, model, post-processor, decoder); the JSON configs beside it add the special
tokens, the chat template and the end-of-sequence ids.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

_REPLACEMENT_CHAR = "\ufffd"
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """Character -> byte of GPT-2's byte-level BPE: printable Latin-1 bytes stand for themselves, the other
    bytes (controls, space, ...) for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + n)
    return {c: b for b, c in chars.items()}


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(token: str | dict[str, Any] | None) -> str | None:
    """A special token from tokenizer_config.json: a plain string or a serialized AddedToken dict."""
    if isinstance(token, dict):
        return token.get("content")
    return token


def _as_id_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _read_chat_template(path: str, tokenizer_config: dict[str, Any]) -> str | None:
    """The model's chat template: `chat_template.jinja` (what recent transformers save), else the
    `chat_template` of tokenizer_config.json (a string, or a list of named templates: take "default")."""
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = tokenizer_config.get("chat_template")
    if template is None:
        template = _read_json(os.path.join(path, "chat_template.json")).get("chat_template")
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return template


def _flatten_content(message: dict[str, Any]) -> dict[str, Any]:
    """OpenAI-style content parts ([{"type": "text", "text": ...}, ...]) become one string, joined by newlines."""
    content = message.get("content")
    if not isinstance(content, list):
        return dict(message)
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"only text content parts are supported, got a part of type {kind!r}")
        texts.append(part["text"])
    return {**message, "content": "\n".join(texts)}


def _strings(value: Any) -> list[str]:
    """Every string in a JSON-like value (keys included)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return []


def _tool_call_arguments_as_objects(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message's tool-call arguments as objects. OpenAI clients send each call's ``arguments`` as a
    JSON string; the templates of GLM-4.5, MiniMax-M2 and Qwen3-Coder iterate over them as a mapping (one XML
    element per argument), and Qwen3's writes a mapping with ``tojson``. A string that is not a JSON object is
    left as it is."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return message
    parsed = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        args = fn.get("arguments") if isinstance(fn, dict) else None
        if isinstance(args, str):
            try:
                value = json.loads(args)
            except ValueError:
                value = None
            if isinstance(value, dict):
                call = {**call, "function": {**fn, "arguments": value}}
        parsed.append(call)
    return {**message, "tool_calls": parsed}


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters (<, >, &, '), which chat templates do not expect.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(template: str) -> jinja2.Template:
    """Compile a chat template in a sandbox with the environment Hugging Face templates are written for
    (trimmed blocks, loop controls, `raise_exception`, `strftime_now`, a non-escaping `tojson`)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


class Tokenizer:
    """Encode, decode and chat-format text for one model.

    Built by `from_pretrained` from a Hugging Face directory. `eos_token_ids` is the union of every end
    token the directory names (tokenizer_config.json, generation_config.json, config.json), so generation
    stops on any of them, as `transformers`' `generate` does.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_bos_token: bool | None = None,
        chat_template: str | None = None,
        eos_token_ids: Sequence[int] = (),
        model_max_length: int | None = None,
        source: str = "<in memory>",
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token is not None else None
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self.source = source
        eos = [backend.token_to_id(eos_token)] if eos_token is not None else []
        self.eos_token_ids: list[int] = list(dict.fromkeys(i for i in [*eos, *eos_token_ids] if i is not None))
        self._compiled_template: jinja2.Template | None = None
        self.control_tokens = [t.content for t in backend.get_added_tokens_decoder().values() if t.special]
        # A twin that encodes control-token strings as plain text (kept apart: the switch is not thread-safe).
        self._literal = tokenizers.Tokenizer.from_str(backend.to_str())
        self._literal.encode_special_tokens = True
        decoder = backend.decoder.__getstate__().decode() if backend.decoder is not None else ""
        self._byte_level = _byte_level_alphabet() if '"ByteLevel"' in decoder else None
        self._added = {t.content for t in backend.get_added_tokens_decoder().values()}

    @classmethod
    def from_pretrained(cls, path: str, chat_template: str | None = None) -> Tokenizer:
        """Load the tokenizer of a Hugging Face model directory.

        `chat_template` overrides the directory's template: a jinja string or the path of a file holding one.
        """
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise ValueError(
                f"no tokenizer.json in {path!r}: the model directory needs the Hugging Face fast-tokenizer file "
                "(save it with transformers' tokenizer.save_pretrained, which writes tokenizer.json)"
            )
        backend = tokenizers.Tokenizer.from_file(tokenizer_file)
        tokenizer_config = _read_json(os.path.join(path, "tokenizer_config.json"))
        generation_config = _read_json(os.path.join(path, "generation_config.json"))
        model_config = _read_json(os.path.join(path, "config.json"))
        if chat_template is not None and os.path.isfile(chat_template):
            with open(chat_template, encoding="utf-8") as f:
                chat_template = f.read()
        max_length = tokenizer_config.get("model_max_length")
        return cls(
            backend,
            bos_token=_token_content(tokenizer_config.get("bos_token")),
            eos_token=_token_content(tokenizer_config.get("eos_token")),
            add_bos_token=tokenizer_config.get("add_bos_token"),
            chat_template=chat_template or _read_chat_template(path, tokenizer_config),
            eos_token_ids=_as_id_list(generation_config.get("eos_token_id"))
            + _as_id_list(model_config.get("eos_token_id")),
            model_max_length=int(max_length) if max_length is not None else None,
            source=path,
        )

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the model's embedding may be padded beyond it)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """At least the input bytes any one token covers, so that a text of B bytes has at least B / this many
        tokens: the longest token in its vocabulary spelling or in its bytes, whichever is longer (a Metaspace '▁' is
        3 bytes standing for 1 input byte, a byte-level character 2 for 1), times 4 when a normalizer may shrink the
        text before it is split (NFKC makes 1 byte of a 3-byte full-width letter, NFC 3 of 9 bytes of Hangul
        jamo)."""
        longest = max((max(len(t.encode()), len(self.token_bytes(i)))
                       for i in range(self.vocab_size) if (t := self.backend.id_to_token(i)) is not None), default=1)
        return max(longest, 1) * (4 if self.backend.normalizer is not None else 1)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. With `add_special_tokens`, the post-processor of tokenizer.json adds its
        special tokens, and BOS is prepended when tokenizer_config.json asks for it (`add_bos_token`) but the
        post-processor does not add it. Encode a rendered chat template with `add_special_tokens=False`:
        templates write their own BOS."""
        # encode_batch releases the GIL while it works (encode does not): a long text never stalls other threads.
        ids = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id, *ids]
        return ids

    def encode_literal(self, text: str) -> list[int]:
        """Token ids of `text` with control-token strings (``<|im_start|>``...) encoded as plain text."""
        return self._literal.encode_batch([text], add_special_tokens=False)[0].ids

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, *,
                    continue_final_message: bool = False, control_tokens_in_content: bool = False,
                    **extra: Any) -> list[int]:
        """Render `messages` with the chat template and encode them, so that message content cannot become
        control tokens: the template's own special tokens are the only ones (unless
        `control_tokens_in_content`, for trusted clients). Content holding a control-token string is encoded as
        plain text where the template placed it verbatim; if the template changed such content, ValueError. Other fields
        of the messages and the template variables (``tools``) cannot hold control tokens (ValueError)."""
        if not control_tokens_in_content:
            fields = [v for message in messages for k, v in message.items() if k != "content"]
            strings = _strings(fields) + _strings(extra)
            forged = next((t for text in strings for t in self.control_tokens if t in text), None)
            if forged is not None:
                raise ValueError(f"a message field other than content, or a tool definition, contains the control "
                                 f"token {forged!r}; remove it")
        text = self.apply_chat_template(messages, add_generation_prompt,
                                        continue_final_message=continue_final_message, **extra)
        contents = [_flatten_content(m).get("content") or "" for m in messages]
        risky = [c for c in contents if any(t in c for t in self.control_tokens)]
        if control_tokens_in_content or not risky:
            return self.encode(text, add_special_tokens=False)
        ids: list[int] = []
        pos = 0
        for content in risky:
            start = text.find(content, pos)
            if start < 0:
                token = next(t for t in self.control_tokens if t in content)
                raise ValueError(f"a message contains the control token {token!r}, which the chat template does not "
                                 "keep verbatim; remove it from the message")
            ids += self.encode(text[pos:start], add_special_tokens=False) + self.encode_literal(content)
            pos = start + len(content)
        return ids + self.encode(text[pos:], add_special_tokens=False)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, which may be part of a UTF-8 character (byte-level BPE, byte-fallback
        ``<0xE4>`` tokens), where decoding the token alone gives U+FFFD."""
        token = self.backend.id_to_token(token_id)
        if token is None:
            return b""
        if token not in self._added:
            if self._byte_level is not None and all(c in self._byte_level for c in token):
                return bytes(self._byte_level[c] for c in token)
            if m := _BYTE_FALLBACK.fullmatch(token):
                return bytes([int(m.group(1), 16)])
        return self.decode([token_id], skip_special_tokens=False).encode()

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        **extra: Any,
    ) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) with the model's chat template (or the given
        `chat_template`). `extra` reaches the template as variables (e.g. `tools`, `enable_thinking`).

        `continue_final_message` leaves the last message open so that the model continues it (a prefilled
        answer): the text ends right after its content, whatever the template puts behind it (an end-of-turn
        token). It excludes `add_generation_prompt`. ValueError if the rendered text does not contain it."""
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        if chat_template is not None:
            template = compile_chat_template(chat_template)
        elif self.chat_template:
            if self._compiled_template is None:
                self._compiled_template = compile_chat_template(self.chat_template)
            template = self._compiled_template
        else:
            raise ValueError(
                f"the tokenizer of {self.source!r} has no chat template (no chat_template in tokenizer_config.json "
                "and no chat_template.jinja): pass one (a jinja template string or file) with the server's "
                "--chat-template flag (chat_template= in Python), or send a plain-text prompt to the completions "
                "endpoint instead"
            )
        variables = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "", **extra}
        flat = [_tool_call_arguments_as_objects(_flatten_content(m)) for m in messages]
        text = template.render(messages=flat, add_generation_prompt=add_generation_prompt, **variables)
        if not continue_final_message:
            return text
        final = (flat[-1].get("content") or "").strip() if flat else ""
        if final not in text:
            raise ValueError("continue_final_message: the chat template does not keep the last message's content "
                             "verbatim, so it cannot be continued")
        return text[: text.rindex(final) + len(final)]


class IncrementalDetokenizer:
    """Turn a stream of generated token ids into text, releasing only text that can no longer change.

    Byte-level BPE tokens may end inside a UTF-8 character, and decoders such as SentencePiece's drop the
    leading space of the first token they see, so tokens are not decoded one by one: each step decodes the
    window `ids[prefix_offset:]` and keeps what follows the decoding of `ids[prefix_offset:read_offset]`
    (text already taken). While the window decodes to a trailing U+FFFD (an incomplete character), nothing
    is taken and the window grows. The concatenation of the taken pieces equals one full `decode`; the one
    exception is invalid UTF-8 from byte-fallback tokens (`<0xE4>`), which a full decode turns into U+FFFD for
    the whole run of byte tokens, so a later byte can change text that was already final.

    Stop strings: text that could still be the start of a stop string is held back; once a stop string
    appears, the text before it is the last output, `stopped` is set, `matched_stop` names the string and
    later tokens are ignored. `flush()` returns what was held back when the request ends another way.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        self.stopped = False
        self.matched_stop: str | None = None
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._decoded = ""  # all text taken from the windows so far; self.text is a prefix of it

    def add(self, token_ids: Iterable[int]) -> str:
        """Append generated tokens; return the newly final text ("" if nothing is final yet or after a stop)."""
        if self.stopped:
            return ""
        self._ids.extend(token_ids)
        self._take_decoded(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """End of the request: return everything still held back (an unfinished character decodes to U+FFFD,
        as a full decode would show it), still cut at a stop string if one appears."""
        if self.stopped:
            return ""
        self._take_decoded(final=True)
        return self._release(final=True)

    def _take_decoded(self, final: bool) -> None:
        if self._read_offset == len(self._ids):
            return
        decode = self.tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset : self._read_offset], self.skip_special_tokens)
        window_text = decode(self._ids[self._prefix_offset :], self.skip_special_tokens)
        if len(window_text) > len(prefix_text) and (final or not window_text.endswith(_REPLACEMENT_CHAR)):
            self._decoded += window_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)

    def _release(self, final: bool) -> str:
        # Text already released holds no stop string and ends in no stop-string prefix that was held back,
        # so a stop string can only start in the unreleased part.
        start = len(self.text)
        pending = self._decoded[start:]
        found = [(pending.find(s), s) for s in self.stop]
        found = [(pos, s) for pos, s in found if pos >= 0]
        if found:
            pos, stop = min(found, key=lambda f: f[0])
            self.stopped = True
            self.matched_stop = stop
            out = pending[:pos]
        else:
            out = pending if final else pending[: len(pending) - self._held_back(pending)]
        self.text += out
        return out

    def _held_back(self, pending: str) -> int:
        """Length of the longest suffix of `pending` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(pending)), longest, -1):
                if pending.endswith(stop[:n]):
                    longest = n
                    break
        return longest


@dataclass
class TextDelta:
    """One engine output of a request turned into text: the new text (stop strings applied), and, when the request
    ends here, how (``finish_reason`` "stop" or "length"; ``matched_stop`` the stop string or token id).
    ``abort``: a stop string ended it before the engine did, so the caller aborts it in the engine (freeing its
    caches). A request the engine ended otherwise (abort, error) gets no finish reason here: the caller decides."""

    text: str
    finish_reason: str | None = None
    matched_stop: str | int | None = None
    abort: bool = False


def text_delta(detok: IncrementalDetokenizer, new_token_ids: Iterable[int], finished: bool,
               finish_reason: str | None, matched_stop: int | None) -> TextDelta:
    """The one output path of the offline API and the HTTP server: detokenize a step's new tokens, apply stop
    strings, and flush the held-back text when the engine ends the request."""
    text = detok.add(new_token_ids)
    if detok.stopped:
        return TextDelta(text, "stop", detok.matched_stop, abort=not finished)
    if finished and finish_reason in ("stop", "length"):
        return TextDelta(text + detok.flush(), finish_reason, matched_stop)
    return TextDelta(text)
