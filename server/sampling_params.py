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
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 512
MAX_STOP_TOKEN_IDS = 1024
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


@dataclass(config=ConfigDict(strict=True))
class SamplingParams:
    """How to pick each new token and when to stop.

    ``temperature`` below ``SAMPLING_EPS`` (0 included) is greedy. ``top_k <= 0`` and ``top_p == 1`` disable those
    filters. ``seed`` makes a sampled request reproducible regardless of what else is in its batch (any int64 or
    uint64; used modulo 2^63). ``stop`` strings are matched on the detokenized text by whoever detokenizes (the
    offline API or the HTTP server); ``stop_token_ids`` and EOS are handled by the engine, which also checks them
    against the vocabulary. ``logprobs`` = number of top alternatives to return per generated token (0 returns
    only the chosen token's logprob; None returns none). Invalid values raise ``ValueError`` naming the field.
    """

    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = -1
    max_tokens: MaxTokens = 16
    min_tokens: MinTokens = 0
    seed: Seed | None = None
    stop: StopStrings = Field(default_factory=list)
    stop_token_ids: StopTokenIds = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: Logprobs | None = None
    skip_special_tokens: bool = True

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _min_below_max(self) -> SamplingParams:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def generator_seed(self) -> int | None:
        return None if self.seed is None else self.seed % SEED_MODULUS

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ``ValueError`` unless every stop token id is a token of the model."""
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids: token id {bad[0]} is out of range [0, {vocab_size})")
