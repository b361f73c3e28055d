"""OpenAI-compatible request bodies, their validation, and the error envelope.

The boundary of the server: every byte a client sends is checked here before anything else sees it.
- JSON: malformed JSON, ``NaN``/``Infinity``, integers of more than ``MAX_INT_DIGITS`` digits, nesting deeper
  than ``MAX_JSON_DEPTH`` and strings that are not valid Unicode (lone surrogates, escaped or raw) are a 400.
- Types are strict (a string is not a number, a bool is not an int, a float is not an int); ranges come from the
  shared declarations in :mod:`server.sampling_params`.
- Fields: every field a body accepts is implemented. ``IGNORED_FIELDS`` do not change the output and are
  accepted; ``NEUTRAL_ONLY_FIELDS`` (OpenAI parameters this server does not implement) are accepted only at
  their neutral value; any other field is a 400 naming it, as OpenAI answers.
Every rejection is an ``APIError``, which the HTTP layer answers with
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.entrypoints.structured import (
    ResponseFormat,
    StructuredOutputError,
    StructuredOutputsParams,
    openai_structured_output,
)
from server.sampling_params import (
    SEED_MODULUS,
    LogitBias,
    Logprobs,
    MaxTokens,
    MinP,
    MinTokens,
    Penalty,
    RepetitionPenalty,
    SamplingParams,
    Seed,
    StopStrings,
    StopTokenIds,
    StructuredOutput,
    Temperature,
    TopK,
    TopP,
)

MAX_N = 128
MAX_JSON_DEPTH = 64
MAX_INT_DIGITS = 40  # more than any int64/uint64 needs
MAX_PROMPTS = 1024  # prompts of one completions request (each is one choice or more)
MAX_PROFILE_STEPS = 100_000

# Accepted and ignored: they do not change what is generated.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"})
# OpenAI / vLLM parameters that would change the output and are not implemented: accepted only at their neutral
# value.
NEUTRAL_ONLY_FIELDS: dict[str, Any] = {
    "best_of": 1, "suffix": "", "tools": [], "tool_choice": "none",
}


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


# ---- JSON ------------------------------------------------------------------------------------------------------


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise bad_request(f"The body holds an integer of {len(text)} digits; at most {MAX_INT_DIGITS} are accepted.",
                          code="invalid_json")
    return int(text)


def _no_constant(name: str) -> float:
    raise bad_request(f"{name} is not valid JSON.", code="invalid_json")


def _check_tree(obj: Any, depth: int = 0) -> None:
    """Depth limit, and valid Unicode in every string and key (json decodes ``\\ud800`` to a lone surrogate)."""
    if depth > MAX_JSON_DEPTH:
        raise bad_request(f"The JSON body is nested more than {MAX_JSON_DEPTH} levels deep.", code="invalid_json")
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            raise bad_request("The body holds a string that is not valid Unicode (a lone surrogate).",
                              code="invalid_unicode") from None
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_tree(k, depth + 1)
            _check_tree(v, depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            _check_tree(v, depth + 1)


def parse_json_object(raw: bytes) -> dict:
    """Decode a request body that must be a JSON object, within the limits in the module docstring."""
    try:
        obj = json.loads(raw, parse_int=_parse_int, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"We could not parse the JSON body of your request ({e}).", code="invalid_json") from None
    except RecursionError:
        raise bad_request(f"The JSON body is nested more than {MAX_JSON_DEPTH} levels deep.",
                          code="invalid_json") from None
    if not isinstance(obj, dict):
        raise bad_request(f"The request body must be a JSON object, got {type(obj).__name__}.")
    _check_tree(obj)
    return obj


# ---- bodies ----------------------------------------------------------------------------------------------------


class RequestBody(BaseModel):
    """A request body: extra fields are checked by :func:`check_extra_fields` against ``ignored_fields`` (accepted,
    no effect) and ``neutral_only_fields`` (accepted at their neutral value only); any other is refused."""

    model_config = ConfigDict(extra="allow", strict=True)
    ignored_fields: ClassVar[frozenset[str]] = IGNORED_FIELDS
    neutral_only_fields: ClassVar[dict[str, Any]] = NEUTRAL_ONLY_FIELDS


class StartProfileRequest(RequestBody):
    """POST /start_profile (an empty body is the defaults). Where the profiles go is the server's
    ``--profile-dir``, not a request field: a client does not choose paths on the server. ``num_steps``: stop by
    itself after that many engine steps (SGLang's field), instead of at POST /stop_profile."""

    record_shapes: bool = False
    num_steps: Annotated[int, Field(ge=1, le=MAX_PROFILE_STEPS)] | None = None


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``: usage in the stream (at the end, or on every chunk)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries the usage so far


class _SamplingBody(RequestBody):
    """Fields shared by /v1/completions and /v1/chat/completions. ``None`` means "the default"."""

    model: str | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_tokens: MinTokens | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    stop: StopStrings | str | None = None
    stop_token_ids: StopTokenIds | None = None
    seed: Seed | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    min_p: MinP | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    logit_bias: LogitBias | None = None
    prompt_logprobs: Logprobs | None = None  # vLLM's
    return_token_ids: bool | None = None  # vLLM's: the prompt's and the completion's token ids in the response
    # vLLM's: keep only the prompt's last k tokens (-1: as many as the context holds)
    truncate_prompt_tokens: Annotated[int, Field(ge=-1)] | None = None
    return_tokens_as_token_ids: bool | None = None  # vLLM's: logprob tokens as "token_id:{id}"
    logprob_token_ids: StopTokenIds | None = None  # vLLM's: the logprobs of these ids instead of the top ones
    cache_salt: Annotated[str, Field(min_length=1, max_length=1024)] | None = None  # vLLM's prefix-cache isolation
    # structured outputs (server/entrypoints/structured.py): OpenAI's, vLLM's and vLLM's older names
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None
    guided_json: dict[str, Any] | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class CompletionRequest(_SamplingBody):
    """The body of ``POST /v1/completions``."""

    neutral_only_fields: ClassVar[dict[str, Any]] = NEUTRAL_ONLY_FIELDS | {"use_beam_search": False}
    prompt: Any  # str | list[str] | list[int] | list[list[int]]; checked by normalize_prompt
    logprobs: Logprobs | None = None
    echo: bool | None = None


class TextPart(BaseModel):
    """A text part of a message's content list."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A message. As vLLM accepts them: any role the chat template knows (custom roles included; the template
    refuses those it does not), and fields beyond OpenAI's, which reach the template as sent (as do ``name``,
    ``tool_calls``, ``tool_call_id`` and ``reasoning_content``)."""

    model_config = ConfigDict(extra="allow", strict=True)
    role: Annotated[str, Field(min_length=1, max_length=64)]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDefinition(BaseModel):
    """A function tool: its name, description and JSON-schema parameters."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    """A tool the model may call (OpenAI's function tool)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    """The function a named ``tool_choice`` calls."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str


class NamedToolChoice(BaseModel):
    """``tool_choice`` naming the function to call."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_SamplingBody):
    """The body of ``POST /v1/chat/completions``."""

    neutral_only_fields: ClassVar[dict[str, Any]] = {
        k: v for k, v in NEUTRAL_ONLY_FIELDS.items() if k not in ("tools", "tool_choice")
    } | {"use_beam_search": False}
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: Logprobs | None = None
    add_generation_prompt: bool | None = None  # vLLM: default true
    continue_final_message: bool | None = None  # vLLM: continue the last message (a prefilled answer)
    tools: Annotated[list[Tool], Field(max_length=1024)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM / SGLang: more variables for the chat template
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None  # reaches the template
    separate_reasoning: bool | None = None  # SGLang's: false leaves the reasoning in the content
    include_reasoning: bool | None = None  # vLLM's: false drops the reasoning
    echo: bool | None = None  # vLLM's: the last message's content first, when it is the assistant's


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict"})


def _union_tag_at(loc: tuple) -> int | None:
    """Index of the first union-member tag in a pydantic error location (``list[...]``, ``str``...), if any."""
    for i, p in enumerate(loc):
        if isinstance(p, str) and not p.isdigit() and (not p.isidentifier() or p in _TYPE_TAGS):  # "5": a key
            return i
    return None


def validation_error(e: ValidationError) -> APIError:
    """A pydantic validation failure as a 400 naming the parameter (``messages.0.role``); a value that matches
    none of a union's forms names the union's field and its forms."""
    err = e.errors()[0]
    loc = err["loc"]
    if "[key]" in loc:  # a bad dict key: only logit_bias has typed keys
        param = ".".join(str(p) for p in loc[: loc.index("[key]") - 1])
        return bad_request(f"Invalid key {loc[loc.index('[key]') - 1]!r} in '{param}': keys must be token ids as "
                           'decimal strings, e.g. {"50256": -100}.', param=param, code="invalid_value")
    cut = _union_tag_at(loc)
    param = ".".join(str(p) for p in loc[:cut]) or None
    if err["type"] == "missing" and cut is None:
        return bad_request(f"Missing required parameter: '{param}'.", param=param)
    if err["type"] == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}.", param=param,
                           code="unrecognized_parameter")
    if cut is not None:
        forms = list(dict.fromkeys(str(x["loc"][cut]) for x in e.errors()
                                   if len(x["loc"]) > cut and x["loc"][:cut] == loc[:cut]))
        return bad_request(f"Invalid value for '{param}': it matches none of the accepted forms ({', '.join(forms)}).",
                           param=param, code="invalid_type")
    code = "invalid_type" if err["type"].endswith(("_type", "_parsing", "literal_error")) else "invalid_value"
    return bad_request(f"Invalid value for '{param}': {err['msg']}.", param=param, code=code)


def check_extra_fields(body: RequestBody, prefix: str = "") -> None:
    """400 for a field ``body`` does not declare, unless it is one of its ignored or neutral-only fields (at the
    neutral value); ``prefix`` names where the body sits in the request (``sampling_params.``)."""
    for name, value in (body.model_extra or {}).items():
        param = prefix + name
        if name in body.ignored_fields:
            continue
        if name in body.neutral_only_fields:
            neutral = body.neutral_only_fields[name]
            # the same JSON value: True == 1 and 1.0 == 1 in Python, but `best_of: true` is no neutral best_of
            if value is None or (value == neutral and type(value) is type(neutral)):
                continue
            raise bad_request(f"'{param}' is not supported by this server (only {json.dumps(neutral)} is "
                              "accepted).", param=param, code="unsupported_parameter")
        raise bad_request(f"Unrecognized request argument supplied: {param}.", param=param,
                          code="unrecognized_parameter")


def parse_body(raw: bytes, model: type[RequestBody]) -> Any:
    """Decode and validate a request body (see the module docstring); every failure is an ``APIError`` 400."""
    return validate_body(parse_json_object(raw), model)


LARGE_BODY_BYTES = 1 << 20


async def parse_body_off_loop(raw: bytes, model: type[RequestBody]) -> Any:
    """:func:`parse_body`, on a worker thread for a body of ``LARGE_BODY_BYTES`` or more: decoding and validating
    megabytes takes tens of milliseconds of CPU, during which the event loop would answer nothing (``/health``); a
    worker thread hands the GIL back every few milliseconds."""
    if len(raw) < LARGE_BODY_BYTES:
        return parse_body(raw, model)
    return await asyncio.to_thread(parse_body, raw, model)


def validate_body(obj: dict, model: type[RequestBody]) -> Any:
    """Validate a decoded JSON object as ``model``, extra fields included; every failure is a 400."""
    try:
        body = model.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e) from None
    check_extra_fields(body)
    return body


# ---- resolution ------------------------------------------------------------------------------------------------


def normalize_prompt(prompt: Any, vocab_size: int) -> list[str | list[int]]:
    """The prompts of a completion request: each a non-empty string or a non-empty list of valid token ids."""
    if isinstance(prompt, str) or _is_token_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and (all(isinstance(p, str) for p in prompt)
                                                   or all(_is_token_ids(p) for p in prompt)):
        prompts = prompt  # strings or token-id lists, not a mix (OpenAI's four forms)
    else:
        raise bad_request(
            "'prompt' must be a string, a list of strings, a list of token ids or a list of token-id lists.",
            param="prompt",
        )
    if len(prompts) > MAX_PROMPTS:
        raise bad_request(f"'prompt' holds {len(prompts)} prompts; at most {MAX_PROMPTS} are accepted per request.",
                          param="prompt")
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


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as the chat template expects them: content is a string or a list of text parts (which the
    tokenizer joins); only assistant turns (and tool-calling turns) may leave it out."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if content is None:
            if m.role != "assistant":
                raise bad_request(f"Messages with role '{m.role}' need a 'content'.", param=f"messages.{i}.content")
            content = ""
        msg = m.model_dump(exclude_none=True)
        msg["content"] = content if isinstance(content, str) else [p.model_dump() for p in content]
        out.append(msg)
    return out


def model_not_found(name: str, served_model_name: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist; this server serves '{served_model_name}'.",
                    param="model", code="model_not_found")


def check_model(name: str | None, served_model_name: str) -> None:
    """404 ``model_not_found`` (as OpenAI answers) unless ``name`` is absent or the served name."""
    if name is not None and name != served_model_name:
        raise model_not_found(name, served_model_name)


def stop_list(stop: list[str] | str | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def check(ok: bool, param: str, message: str) -> None:
    """400 naming ``param`` unless ``ok``."""
    if not ok:
        raise bad_request(message, param=param)


def check_token_ids(ids: Iterable[int | str], vocab_size: int, param: str) -> None:
    """400 naming ``param`` unless every id (list items or, for logit_bias, keys) is a token of the model."""
    bad = [t for t in map(int, ids) if t >= vocab_size]
    if bad:
        raise bad_request(f"Token id {bad[0]} in '{param}' is out of range: ids must be in [0, {vocab_size}).",
                          param=param, code="invalid_token_id")


def make_sampling_params(param_names: dict[str, str] | None = None, **fields: Any) -> SamplingParams:
    """``SamplingParams(**fields)`` with a validation error turned into a 400 naming the request's parameter
    (``param_names`` maps SamplingParams field names to the request's names where they differ)."""
    try:
        return SamplingParams(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "min_tokens"  # the only cross-field check
        param = (param_names or {}).get(field, field)
        raise bad_request(f"Invalid value for '{param}': {err['msg'].removeprefix('Value error, ')}.",
                          param=param) from None


def structured_output(resolve: Callable[..., StructuredOutput | None], *args: Any) -> StructuredOutput | None:
    """``resolve(*args)`` (a resolver of :mod:`server.entrypoints.structured`), its refusal as a 400."""
    try:
        return resolve(*args)
    except StructuredOutputError as e:
        raise bad_request(str(e), param=e.param, code="invalid_value") from None


def sampling_params_for(
    req: _SamplingBody,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None,
    prompt_len: int,
    max_model_len: int,
    n: int,
    vocab_size: int,
) -> list[SamplingParams]:
    """One SamplingParams per choice (``n`` of them; seed + i for choice i). ``max_tokens=None`` fills the
    context. Raises 400 ``context_length_exceeded`` when prompt + max_tokens does not fit ``max_model_len``."""
    check_token_ids(req.stop_token_ids or [], vocab_size, "stop_token_ids")
    check_token_ids(req.logit_bias or {}, vocab_size, "logit_bias")
    check_token_ids(req.logprob_token_ids or [], vocab_size, "logprob_token_ids")
    check(not req.logprob_token_ids or logprobs is not None, "logprob_token_ids",
          "'logprob_token_ids' needs logprobs: send 'logprobs' (chat: 'logprobs': true).")
    is_chat = isinstance(req, ChatCompletionRequest)
    if max_tokens is None:
        max_tokens = max(max_model_len - prompt_len, 1)
    check_context_length(prompt_len, max_tokens, max_model_len, "messages" if is_chat else "prompt")
    names = {"max_tokens": "max_completion_tokens" if is_chat and req.max_completion_tokens is not None
             else "max_tokens", "logprobs": "top_logprobs" if is_chat else "logprobs"}
    base = make_sampling_params(
        names,
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, max_tokens=max_tokens,
        min_tokens=req.min_tokens, stop=stop_list(req.stop), stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        skip_special_tokens=req.skip_special_tokens,
        min_p=req.min_p, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, logit_bias=req.logit_bias, cache_salt=req.cache_salt,
        logprob_token_ids=req.logprob_token_ids,
        structured=structured_output(openai_structured_output, req.response_format, req.structured_outputs, {
            name: getattr(req, name) for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")}),
    )
    return [
        with_seed(base, None if req.seed is None else (req.seed + i) % SEED_MODULUS) for i in range(n)
    ]


def truncate_prompt(ids: list[int], keep: int | None, max_model_len: int) -> list[int]:
    """vLLM's ``truncate_prompt_tokens``: the prompt's last ``keep`` tokens (-1: the last ``max_model_len - 1``,
    leaving room for one generated token); None or a longer ``keep`` leaves the prompt whole."""
    if keep is None:
        return ids
    check(keep != 0, "truncate_prompt_tokens",
          "'truncate_prompt_tokens' must be -1 (keep what the context holds) or a number of tokens >= 1.")
    keep = max_model_len - 1 if keep == -1 else keep
    return ids[-keep:] if 0 < keep < len(ids) else ids


def with_seed(params: SamplingParams, seed: int | None) -> SamplingParams:
    """A copy of ``params`` (lists and dicts copied too) with another seed."""
    return SamplingParams(**{**vars(params), "seed": seed, "stop": list(params.stop),
                             "stop_token_ids": list(params.stop_token_ids), "logit_bias": dict(params.logit_bias),
                             "logprob_token_ids": list(params.logprob_token_ids)})


def check_context_length(prompt_len: int, max_tokens: int, max_model_len: int, param: str,
                         limit: str = "'max_tokens' or 'max_completion_tokens'") -> None:
    """400 ``context_length_exceeded`` unless the prompt and the completion fit the model's context, in vLLM's
    words (clients parse them): the prompt alone too long, or ``max_tokens`` too large for what the prompt
    leaves; ``limit`` names the request's own length field (``'max_output_tokens'`` in the Responses API)."""
    if prompt_len >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{prompt_len} input tokens. Please reduce the length of the input {param}.",
            param=param, code="context_length_exceeded")
    if prompt_len + max_tokens > max_model_len:
        raise bad_request(
            f"{limit} is too large: {max_tokens}. This model's maximum context "
            f"length is {max_model_len} tokens and your request has {prompt_len} input tokens ({max_tokens} > "
            f"{max_model_len} - {prompt_len}).",
            param=param, code="context_length_exceeded")


def choice_count(n: int | None) -> int:
    return 1 if n is None else n


def check_prompt_logprobs(req: _SamplingBody) -> None:
    """vLLM's rule: ``prompt_logprobs`` only without ``stream`` (echo with logprobs streams the prompt's)."""
    check(req.prompt_logprobs is None or not req.stream, "prompt_logprobs",
          "'prompt_logprobs' is not available when 'stream' is true; send the request without 'stream' (or, for "
          "completions, use 'echo' with 'logprobs').")


def completion_prompt_logprobs(req: CompletionRequest) -> int | None:
    """Alternatives per prompt token the engine computes for a completion: ``prompt_logprobs`` and, with ``echo``,
    ``logprobs`` (the echoed prompt's tokens carry logprobs too); the larger of the two when both are asked (each
    answer is trimmed to its own)."""
    asked = [k for k in (req.prompt_logprobs, req.logprobs if req.echo else None) if k is not None]
    return max(asked) if asked else None


def chat_generation_prompt(add_generation_prompt: bool | None, continue_final_message: bool | None
                           ) -> tuple[bool, bool]:
    """``(add_generation_prompt, continue_final_message)`` as vLLM resolves them: the generation prompt by
    default, not when the last message is continued; asking for both is a 400."""
    if continue_final_message:
        check(not add_generation_prompt, "continue_final_message",
              "'continue_final_message' and 'add_generation_prompt' cannot both be true.")
        return False, True
    return add_generation_prompt is not False, False


def chat_logprobs(req: ChatCompletionRequest) -> int | None:
    check(req.top_logprobs is None or bool(req.logprobs), "top_logprobs", "'top_logprobs' requires 'logprobs': true.")
    return (req.top_logprobs or 0) if req.logprobs else None


def check_stream_options(req: _SamplingBody) -> None:
    check(req.stream_options is None or bool(req.stream), "stream_options",
           "'stream_options' is only allowed when 'stream' is true.")
