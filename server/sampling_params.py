"""Per-request sampling parameters (the offline API and the HTTP server share them), validated on construction.

Every sampling field's type and range is declared once, here, as an ``Annotated`` type; :class:`SamplingParams`
and the HTTP request bodies (:mod:`server.entrypoints.protocol`) are built from the same declarations, so a value
the engine cannot handle is refused at the boundary (``ValueError``; a 400 over HTTP) and never reaches it.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, Field, field_validator, model_validator
from pydantic.dataclasses import dataclass

# Temperatures below this sample greedily (as vLLM does): dividing by them overflows fp32 logits.
SAMPLING_EPS = 1e-5
MAX_TEMPERATURE = 100.0  # logits / 100 are within rounding of a uniform distribution for any real model
MAX_LOGPROBS = 20
MAX_N = 128  # completions of one prompt in one call
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 512
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024  # entries of one request's logit_bias
MAX_LOGIT_BIAS_VALUE = 100.0  # OpenAI's range: -100 bans a token, 100 forces it
MAX_REPETITION_PENALTY = 100.0
# its reciprocal: a smaller one would divide a logit into fp32 overflow (inf, then NaN probabilities)
MIN_REPETITION_PENALTY = 1.0 / MAX_REPETITION_PENALTY
SEED_MODULUS = 2**63  # seeds are taken modulo this (torch generators take 63-bit seeds), so every int64/uint64 works

Temperature = Annotated[float, Field(ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
TopK = Annotated[int, Field(ge=-1, description="-1 or 0: disabled")]
MaxTokens = Annotated[int, Field(ge=1)]
MinTokens = Annotated[int, Field(ge=0)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
StopStrings = Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]
TokenId = Annotated[int, Field(ge=0)]
StopTokenIds = Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)]
Logprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]
MinP = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
# OpenAI's penalties: subtracted from the logit, once (presence) or per occurrence (frequency) in the output.
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
# vLLM's / SGLang's / transformers' multiplicative penalty on every token of the prompt and the output.
RepetitionPenalty = Annotated[float, Field(ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY,
                                           allow_inf_nan=False)]
LogitBiasValue = Annotated[float, Field(ge=-MAX_LOGIT_BIAS_VALUE, le=MAX_LOGIT_BIAS_VALUE, allow_inf_nan=False)]
# OpenAI's JSON form: token ids as decimal string keys ({"50256": -100}); the offline API may use int keys.
TokenIdKey = Annotated[str, Field(pattern=r"^(0|[1-9][0-9]{0,9})$")]
LogitBias = Annotated[dict[TokenIdKey, LogitBiasValue], Field(max_length=MAX_LOGIT_BIAS)]


STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")
MAX_STRUCTURED_SPEC_CHARS = 1 << 20


@dataclass(frozen=True, config=ConfigDict(strict=True))
class StructuredOutput:
    """A constraint on the generated text, compiled to a grammar and enforced by a token mask on every step.

    ``kind``: ``json`` (``spec`` is a JSON schema, as JSON text), ``json_object`` (any JSON object; ``spec`` empty),
    ``regex`` (``spec`` is a regular expression), ``choice`` (``spec`` is a JSON list of strings: the output is one
    of them), ``grammar`` (``spec`` is an EBNF grammar in xgrammar's GBNF dialect). ``after``: when set, the output is
    free until this text has been generated (a reasoning model's end-of-thinking marker) and constrained from then on.
    ``any_whitespace`` (``json`` and ``json_object``): whitespace between JSON tokens is free (up to a bound per run);
    False writes JSON on one line with ``", "`` and ``": "`` separators, as ``json.dumps`` does (forced tool calls).
    """

    kind: str
    spec: str = ""
    after: str | None = None
    any_whitespace: bool = True

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        if v not in STRUCTURED_KINDS:
            raise ValueError(f"structured output kind must be one of {STRUCTURED_KINDS}, got {v!r}")
        return v

    @field_validator("spec")
    @classmethod
    def _bounded_spec(cls, v: str) -> str:
        if len(v) > MAX_STRUCTURED_SPEC_CHARS:
            raise ValueError(f"a structured output spec may have at most {MAX_STRUCTURED_SPEC_CHARS} characters")
        return v


@dataclass(config=ConfigDict(strict=True))
class SamplingParams:
    """How to pick each new token and when to stop.

    ``temperature`` below ``SAMPLING_EPS`` (0 included) is greedy. ``top_k <= 0`` and ``top_p == 1`` disable those
    filters. ``seed`` makes a sampled request reproducible regardless of what else is in its batch (any int64 or
    uint64; used modulo 2^63). ``stop`` strings are matched on the detokenized text by whoever detokenizes (the
    offline API or the HTTP server); ``stop_token_ids`` and EOS are handled by the engine, which also checks them
    against the vocabulary. ``logprobs`` = number of top alternatives to return per generated token (0 returns
    only the chosen token's logprob; None returns none). ``prompt_logprobs`` (vLLM's) = the same for every prompt
    token from the second on: its logprob given the tokens before it, its rank and the top alternatives, of the
    model's own distribution (no logit controls, no temperature); such a request computes its whole prompt (the
    prefix cache does not serve it). ``n`` = completions per prompt (vLLM's): the offline API runs them as ``n``
    requests, completion i seeded ``seed + i`` when ``seed`` is set (the HTTP server does the same with a request's
    ``n``); the engine serves one completion per request. Invalid values raise ``ValueError`` naming the field.

    Logit controls, applied to the model's logits in this order before temperature (so the logprobs returned
    are of the adjusted distribution): ``logit_bias`` (token id -> value added to its logit, OpenAI), EOS / stop
    tokens masked below ``min_tokens``, ``repetition_penalty`` (vLLM / SGLang / transformers: every token of the
    prompt or the output so far has a positive logit divided by it and a negative one multiplied by it),
    ``frequency_penalty`` (OpenAI: minus penalty x the token's count in the output so far) and
    ``presence_penalty`` (OpenAI: minus penalty once if the token is in the output so far). After temperature,
    ``min_p`` drops tokens whose probability is below ``min_p`` x the most likely token's.
    """

    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = -1
    max_tokens: MaxTokens = 16
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    min_tokens: MinTokens = 0
    seed: Seed | None = None
    stop: StopStrings = Field(default_factory=list)
    stop_token_ids: StopTokenIds = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: Logprobs | None = None
    prompt_logprobs: Logprobs | None = None
    skip_special_tokens: bool = True
    min_p: MinP = 0.0
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: RepetitionPenalty = 1.0
    logit_bias: Annotated[dict[TokenId, LogitBiasValue], Field(max_length=MAX_LOGIT_BIAS)] = Field(
        default_factory=dict)
    # the output must match this (server.engine grammar masks); None: unconstrained
    structured: StructuredOutput | None = None
    # vLLM's: the logprobs of these token ids (in this order) instead of the top ``logprobs`` alternatives
    logprob_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] = Field(default_factory=list)
    # vLLM's per-tenant prefix-cache isolation: requests share cached pages only with requests of the same salt
    cache_salt: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _int_token_keys(cls, v: object) -> object:
        """OpenAI's string keys ("50256") become token ids; anything else is left for the type check."""
        if not isinstance(v, dict):
            return v
        return {int(k) if isinstance(k, str) and k.isascii() and k.isdigit() else k: b for k, b in v.items()}

    @model_validator(mode="after")
    def _min_below_max(self) -> SamplingParams:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        return self

    def completions(self) -> list[SamplingParams]:
        """The ``n`` one-completion requests this stands for: copies with ``n=1``, completion i seeded ``seed + i``
        (modulo 2^63) when ``seed`` is set."""
        return [SamplingParams(**{**vars(self), "n": 1, "stop": list(self.stop),
                                  "stop_token_ids": list(self.stop_token_ids), "logit_bias": dict(self.logit_bias),
                                  "seed": None if self.seed is None else (self.seed + i) % SEED_MODULUS})
                for i in range(self.n)]

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def uses_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def generator_seed(self) -> int | None:
        return None if self.seed is None else self.seed % SEED_MODULUS

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ``ValueError`` unless every stop token id and logit_bias key is a token of the model."""
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", self.logit_bias),
                          ("logprob_token_ids", self.logprob_token_ids)):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise ValueError(f"{name}: token id {bad[0]} is out of range [0, {vocab_size})")
