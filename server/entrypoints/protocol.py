"""OpenAI-compatible request bodies, their validation, and the error envelope.

Request bodies are parsed strictly (a string is not a number, a bool is not an int) but unknown fields are
ignored, as OpenAI clients send fields this server does not implement. Every rejection is an ``APIError``,
which the HTTP layer answers with ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from server.sampling_params import SamplingParams

MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
SEED_MODULUS = 2**63  # seeds (and seed + i for n > 1) are taken modulo this, so every int64 seed is valid


class APIError(Exception):
    """An error answered with the OpenAI envelope and ``status``; ``headers`` e.g. ``Retry-After``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingBody(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions. ``None`` means "the default"."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_tokens: int | None = None
    n: int | None = None
    stop: Any = None  # str | list[str]; checked by hand for a clear message
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None


class CompletionRequest(_SamplingBody):
    prompt: Any  # str | list[str] | list[int] | list[list[int]]; checked by normalize_prompt
    logprobs: int | None = None
    echo: bool | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None  # str | list of {"type": "text", "text": str} | None (assistant turns)


class ChatCompletionRequest(_SamplingBody):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class GenerateRequestBody(_Body):
    """Native ``POST /generate``: ``text`` or ``input_ids``, and SamplingParams fields by name."""

    text: str | None = None
    input_ids: list[int] | None = None
    sampling_params: dict[str, Any] | None = None
    stream: bool | None = None


def parse_body(raw: bytes, model: type[_Body]) -> Any:
    """Decode a JSON object into ``model``; malformed JSON, a non-object or a wrong type is a 400."""
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"We could not parse the JSON body of your request ({e}).", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise bad_request(f"The request body must be a JSON object, got {type(obj).__name__}.")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "missing":
            raise bad_request(f"Missing required parameter: '{param}'.", param=param) from None
        raise bad_request(f"Invalid value for '{param}': {err['msg']}.", param=param, code="invalid_type") from None


def normalize_prompt(prompt: Any, vocab_size: int) -> list[str | list[int]]:
    """The prompts of a completion request: each a non-empty string or a non-empty list of valid token ids."""
    if isinstance(prompt, str) or _is_token_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_token_ids(p) for p in prompt):
        prompts = prompt
    else:
        raise bad_request(
            "'prompt' must be a string, a list of strings, a list of token ids or a list of token-id lists.",
            param="prompt",
        )
    for p in prompts:
        if len(p) == 0:
            raise bad_request("'prompt' must not be empty.", param="prompt")
        if not isinstance(p, str):
            bad = [t for t in p if not 0 <= t < vocab_size]
            if bad:
                raise bad_request(
                    f"Token id {bad[0]} in 'prompt' is out of range: ids must be in [0, {vocab_size}).",
                    param="prompt",
                    code="invalid_token_id",
                )
    return prompts


def _is_token_ids(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The messages as the chat template expects them; content is a string or a list of text parts (which the
    tokenizer joins), and only an assistant turn may leave it out."""
    if not req.messages:
        raise bad_request("'messages' must contain at least one message.", param="messages")
    out = []
    for i, m in enumerate(req.messages):
        content = m.content
        if content is None and m.role == "assistant":
            content = ""
        text_parts = isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content)
        if not (isinstance(content, str) or text_parts):
            raise bad_request(
                "Message content must be a string or a list of text parts ({'type': 'text', 'text': ...}).",
                param=f"messages.{i}.content",
            )
        out.append({"role": m.role, "content": content})
    return out


def check_model(name: str | None, served_model_name: str) -> None:
    if name is not None and name != served_model_name:
        raise bad_request(
            f"The model '{name}' does not exist; this server serves '{served_model_name}'.",
            param="model",
            code="model_not_found",
        )


def _stop_strings(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stops, list) and all(isinstance(s, str) and s for s in stops)):
        raise bad_request("'stop' must be a non-empty string or a list of non-empty strings.", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"'stop' may hold at most {MAX_STOP_STRINGS} strings, got {len(stops)}.", param="stop")
    return stops


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise bad_request(message, param=param)


def sampling_params_for(
    req: _SamplingBody,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_len: int,
    max_model_len: int,
    n: int,
    vocab_size: int,
) -> list[SamplingParams]:
    """One SamplingParams per choice (``n`` of them; seed + i for choice i). ``max_tokens=None`` fills the
    context. Raises 400 ``context_length_exceeded`` when prompt + max_tokens does not fit ``max_model_len``."""
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    top_k = -1 if req.top_k is None or req.top_k == 0 else req.top_k
    min_tokens = req.min_tokens or 0
    _check(math.isfinite(temperature) and temperature >= 0, "temperature",
           f"'temperature' must be >= 0, got {temperature}.")
    _check(0 < top_p <= 1, "top_p", f"'top_p' must be in (0, 1], got {top_p}.")
    _check(top_k >= 1 or top_k == -1, "top_k", f"'top_k' must be -1 (disabled) or >= 1, got {top_k}.")
    _check(max_tokens is None or max_tokens >= 1, "max_tokens", f"'max_tokens' must be >= 1, got {max_tokens}.")
    _check(min_tokens >= 0, "min_tokens", f"'min_tokens' must be >= 0, got {min_tokens}.")
    _check(max_tokens is None or min_tokens <= max_tokens, "min_tokens",
           f"'min_tokens' ({min_tokens}) must not exceed 'max_tokens' ({max_tokens}).")
    stop_ids = req.stop_token_ids or []
    _check(all(0 <= t < vocab_size for t in stop_ids), "stop_token_ids",
           f"'stop_token_ids' must be in [0, {vocab_size}).")
    stop = _stop_strings(req.stop)

    if max_tokens is None:
        max_tokens = max(max_model_len - prompt_len, 1)
    check_context_length(prompt_len, max_tokens, max_model_len,
                         "messages" if isinstance(req, ChatCompletionRequest) else "prompt")
    return [
        SamplingParams(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            seed=None if req.seed is None else (req.seed + i) % SEED_MODULUS,
            stop=list(stop),
            stop_token_ids=list(stop_ids),
            ignore_eos=bool(req.ignore_eos),
            logprobs=logprobs,
            skip_special_tokens=True if req.skip_special_tokens is None else req.skip_special_tokens,
        )
        for i in range(n)
    ]


def check_context_length(prompt_len: int, max_tokens: int, max_model_len: int, param: str) -> None:
    """400 ``context_length_exceeded`` unless the prompt and the completion fit the model's context."""
    if prompt_len + max_tokens > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the {param}, {max_tokens} in the completion). "
            "Please reduce the length of the prompt or of the completion.",
            param=param,
            code="context_length_exceeded",
        )


def choice_count(n: int | None) -> int:
    n = 1 if n is None else n
    _check(1 <= n <= MAX_N, "n", f"'n' must be in [1, {MAX_N}], got {n}.")
    return n


def completion_logprobs(req: CompletionRequest) -> int | None:
    lp = req.logprobs
    _check(lp is None or 0 <= lp <= MAX_LOGPROBS, "logprobs", f"'logprobs' must be in [0, {MAX_LOGPROBS}], got {lp}.")
    if lp is not None and req.echo:
        raise bad_request("'echo' together with 'logprobs' is not supported (prompt logprobs are not computed).",
                          param="echo")
    return lp


def chat_logprobs(req: ChatCompletionRequest) -> int | None:
    top = req.top_logprobs
    _check(top is None or 0 <= top <= MAX_LOGPROBS, "top_logprobs",
           f"'top_logprobs' must be in [0, {MAX_LOGPROBS}], got {top}.")
    _check(top is None or bool(req.logprobs), "top_logprobs", "'top_logprobs' requires 'logprobs': true.")
    return (top or 0) if req.logprobs else None


def native_sampling_params(fields: dict[str, Any] | None) -> SamplingParams:
    """SamplingParams from the native API's ``sampling_params`` object (its field names, unknown ones ignored)."""
    known = {k: v for k, v in (fields or {}).items() if k in SamplingParams.__dataclass_fields__}
    try:
        params = SamplingParams(**known)
        params.validate()
    except (TypeError, ValueError) as e:
        raise bad_request(f"Invalid 'sampling_params': {e}.", param="sampling_params") from None
    return params
