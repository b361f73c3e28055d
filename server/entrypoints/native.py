"""SGLang's native ``POST /generate``: its request fields and response shape for text generation.

Request: ``text`` or ``input_ids`` (one prompt or a batch), ``sampling_params`` (SGLang's names), ``stream``,
``rid``, ``return_logprob`` / ``top_logprobs_num`` / ``return_text_in_logprobs``, and ``logprob_start_len`` (-1,
the default: output tokens only; k >= 0: the prompt's tokens from position k on too). Fields SGLang documents for
other inputs (images, audio, embeddings, LoRA, custom logit processors, hidden states) are refused with 400 unless
neutral.

Response: ``{"text", "output_ids", "meta_info"}`` (a list of them for a batch). ``meta_info`` has ``id``,
``finish_reason`` (``{"type": "stop", "matched": token id or string}``, ``{"type": "length", "length": n}``,
or null while running), ``prompt_tokens``, ``completion_tokens``, ``cached_tokens`` (prompt tokens the prefix
cache served),
``e2e_latency`` (once finished) and, with ``return_logprob``, ``output_token_logprobs`` (``[logprob, token_id,
text or null]`` per token), ``output_top_logprobs``, and ``input_token_logprobs`` / ``input_top_logprobs``: the same
for the prompt's tokens from ``logprob_start_len`` on (the first prompt token's logprob and top list are null: it
follows nothing), empty with the default -1. A stream sends that object after every step with the text, ids and
logprobs so far (cumulative, as SGLang's default; the prompt's logprobs from the first token on), then
``data: [DONE]``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, ClassVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field

from server.entrypoints.protocol import (
    MAX_N,
    RequestBody,
    bad_request,
    check,
    check_context_length,
    check_extra_fields,
    check_model,
    check_token_ids,
    make_sampling_params,
    normalize_prompt,
    parse_body_off_loop,
    stop_list,
    structured_output,
    with_seed,
)
from server.entrypoints.streaming import CLIENT_CLOSED_REQUEST, ChoiceResult, clamp_logprob, collect, stream
from server.entrypoints.structured import sglang_structured_output
from server.entrypoints.tokenizer_manager import ChoiceEvent, TokenizerManager
from server.messages import PromptTokenLogprob, TokenLogprob
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
    Temperature,
    TopK,
    TopP,
)

DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's default, unless --default-max-tokens says otherwise


class NativeSamplingParams(RequestBody):
    """``sampling_params`` of ``/generate`` in SGLang's names; ``json_schema`` (JSON text), ``regex`` and ``ebnf``
    constrain the output (server/entrypoints/structured.py); ``n`` > 1 answers a list, prompt after prompt, each
    prompt's samples together; structural tags and custom logit processors are not supported (refused unless
    neutral)."""

    ignored_fields: ClassVar[frozenset[str]] = frozenset()
    neutral_only_fields: ClassVar[dict[str, Any]] = {
        "structural_tag": None, "stop_regex": None,
        "custom_params": None, "no_stop_trim": False, "spaces_between_special_tokens": True,
    }
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None  # samples per prompt: the answer is a list
    max_new_tokens: MaxTokens | None = None
    min_new_tokens: MinTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    logit_bias: LogitBias | None = None
    stop: StopStrings | str | None = None
    stop_token_ids: StopTokenIds | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    sampling_seed: Seed | None = None
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None


class GenerateRequest(RequestBody):
    """The body of ``/generate`` (see the module docstring)."""

    # SGLang's other fields: metrics, routing and cache keys change nothing here; inputs other than text, extra
    # outputs, LoRA, sessions and disaggregation are not supported (accepted only when left at their default).
    ignored_fields: ClassVar[frozenset[str]] = frozenset({
        "log_metrics", "no_logs", "custom_labels", "priority", "routing_key", "conversation_id", "extra_key",
        "cache_salt", "data_parallel_rank", "routed_dp_rank", "external_trace_header"})
    neutral_only_fields: ClassVar[dict[str, Any]] = {
        name: None for name in (
            "input_embeds", "image_data", "audio_data", "video_data", "mm_hashes", "mm_content_hashes", "video_config",
            "mm_processor_kwargs", "watermark", "lora_path", "lora_id", "custom_logit_processor", "token_ids_logprob",
            "session_id", "session_params", "modalities", "sampling_logprobs_mode", "positional_embed_overrides",
            "bootstrap_host", "bootstrap_port", "bootstrap_room", "bootstrap_pair_key", "decode_tp_size",
            "max_thinking_tokens")
    } | {name: False for name in (
        "return_hidden_states", "return_routed_experts", "return_indexer_topk", "return_sampling_mask",
        "return_flat_raw_top_logprobs", "return_flat_raw_output_top_logprobs", "use_audio_in_video", "background",
        "require_reasoning", "return_bytes", "return_entropy", "return_prompt_token_ids")
    } | {"routed_experts_start_len": 0}
    model: str | None = None
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: NativeSamplingParams | None = None
    rid: str | list[str] | None = None
    stream: bool = False
    return_logprob: bool = False
    logprob_start_len: Annotated[int, Field(ge=-1)] | None = None
    top_logprobs_num: Logprobs | None = None
    return_text_in_logprobs: bool = False


def _prompts(req: GenerateRequest, vocab_size: int) -> tuple[list[str | list[int]], bool]:
    """The prompts and whether the request is a batch (lists in, a list of results out)."""
    if (req.text is None) == (req.input_ids is None):
        raise bad_request("Give exactly one of 'text' and 'input_ids'.", param="text")
    if req.text is not None:
        batch = isinstance(req.text, list)
        check(not batch or bool(req.text), "text", "'text' must not be an empty list.")
        return normalize_prompt(req.text, vocab_size), batch
    batch = bool(req.input_ids) and isinstance(req.input_ids[0], list)
    return normalize_prompt(req.input_ids, vocab_size), batch


def _logprob_start(req: GenerateRequest) -> int | None:
    """The first prompt position whose logprob is returned; None for output tokens only (-1, SGLang's default)."""
    return None if req.logprob_start_len in (None, -1) else req.logprob_start_len


def _sampling_params(req: GenerateRequest, prompt_len: int, max_model_len: int, vocab_size: int,
                     default_max_tokens: int) -> SamplingParams:
    f = req.sampling_params or NativeSamplingParams()
    check_extra_fields(f, "sampling_params.")
    check_token_ids(f.stop_token_ids or [], vocab_size, "sampling_params.stop_token_ids")
    check_token_ids(f.logit_bias or {}, vocab_size, "sampling_params.logit_bias")
    max_tokens = f.max_new_tokens if f.max_new_tokens is not None else default_max_tokens
    check_context_length(prompt_len, max_tokens, max_model_len, "text" if req.text is not None else "input_ids",
                         "'max_new_tokens'")
    fields = f.model_dump(exclude={"n", "max_new_tokens", "min_new_tokens", "sampling_seed", "stop", "json_schema",
                                   "regex", "ebnf"})
    names = {k: f"sampling_params.{k}" for k in fields} | {"max_tokens": "sampling_params.max_new_tokens",
                                                         "min_tokens": "sampling_params.min_new_tokens"}
    top = (req.top_logprobs_num or 0) if req.return_logprob else None
    return make_sampling_params(names, **fields, max_tokens=max_tokens, min_tokens=f.min_new_tokens,
                                seed=f.sampling_seed, stop=stop_list(f.stop), logprobs=top,
                                prompt_logprobs=top if _logprob_start(req) is not None else None,
                                structured=structured_output(sglang_structured_output, f.json_schema, f.regex, f.ebnf))


class NativeServing:
    """``POST /generate``; ``tm`` does the engine work."""

    def __init__(self, tm: TokenizerManager, served_model_name: str):
        self.tm = tm
        self.model = served_model_name

    async def generate(self, request: Request) -> Response:
        arrival = time.monotonic()
        req = await parse_body_off_loop(await request.body(), GenerateRequest)
        self.tm.check_available()
        check_model(req.model, self.model)
        check(req.top_logprobs_num is None or req.return_logprob, "top_logprobs_num",
              "'top_logprobs_num' requires 'return_logprob': true.")
        start = _logprob_start(req)
        check(start is None or req.return_logprob, "logprob_start_len",
              "'logprob_start_len' requires 'return_logprob': true.")
        prompts, batch = _prompts(req, self.tm.vocab_size)
        n = (req.sampling_params.n if req.sampling_params else None) or 1
        batch = batch or n > 1  # SGLang answers a list for a batch and for n > 1
        check(not (batch and req.stream), "stream", "Streaming is supported for one prompt and one sample at a "
              "time ('n' 1).")
        rids = [req.rid] if isinstance(req.rid, str) else req.rid
        check(rids is None or len(rids) == len(prompts), "rid", f"'rid' must hold one id per prompt "
              f"({len(prompts)}).")
        if rids is not None and n > 1:
            rids = [f"{rid}-{i}" for rid in rids for i in range(n)]
        prompt_ids = [ids for p in prompts for ids in [await self.tm.encode(p, param="text")] * n]  # prompt k: k*n..
        shortest = min(len(ids) for ids in prompt_ids)
        check(start is None or start < shortest, "logprob_start_len",
              f"'logprob_start_len' ({start}) must be below the prompt's length ({shortest} tokens): it is the first "
              "prompt position whose logprob is returned.")
        params = [_sampling_params(req, len(ids), self.tm.max_model_len, self.tm.vocab_size,
                                   self.tm.default_max_tokens(len(ids), DEFAULT_MAX_NEW_TOKENS)) for ids in prompt_ids]
        params = [p if p.seed is None else with_seed(p, (p.seed + i % n) % SEED_MODULUS)
                  for i, p in enumerate(params)]
        gen = self.tm.submit(prompt_ids, params, arrival)
        out = _Output(self.tm, rids or gen.rids, prompt_ids, req, arrival)
        if req.stream:
            return await stream(request, gen, out.chunks)
        results = await collect(request, gen)
        if results is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        bodies = [out.body(i, r) for i, r in enumerate(results)]
        return JSONResponse(bodies if batch else bodies[0])


class _Output:
    """Builds ``/generate`` responses for one request's choices."""

    def __init__(self, tm: TokenizerManager, ids: list[str], prompt_ids: list[list[int]], req: GenerateRequest,
                 arrival: float):
        self.tm, self.ids, self.prompt_ids, self.req, self.arrival = tm, ids, prompt_ids, req, arrival

    def body(self, i: int, r: ChoiceResult) -> dict:
        finish = None
        if r.finish_reason == "stop":
            finish = {"type": "stop", "matched": r.matched_stop}
        elif r.finish_reason == "length":
            finish = {"type": "length", "length": r.completion_tokens}
        meta = {"id": self.ids[i], "finish_reason": finish, "prompt_tokens": len(self.prompt_ids[i]),
                "completion_tokens": r.completion_tokens, "cached_tokens": r.cached_tokens}
        if finish is not None:
            meta["e2e_latency"] = time.monotonic() - self.arrival
        if self.req.return_logprob:
            meta |= self._logprobs(r.logprobs, self._prompt_part(i, r.prompt_logprobs))
        return {"text": r.text, "output_ids": list(r.token_ids), "meta_info": meta}

    def _prompt_part(self, i: int, lps: list[PromptTokenLogprob | None] | None
                     ) -> list[tuple[int, TokenLogprob | None]]:
        """``(token id, logprob)`` of choice ``i``'s prompt tokens from ``logprob_start_len`` on, once they are in."""
        start = _logprob_start(self.req)
        if start is None or lps is None:
            return []
        return list(zip(self.prompt_ids[i][start:], lps[start:], strict=True))

    def _logprobs(self, lps: list[TokenLogprob], prompt: list[tuple[int, TokenLogprob | None]]) -> dict:
        text = self.req.return_text_in_logprobs

        def entry(token_id: int, logprob: float | None) -> list:
            return [None if logprob is None else clamp_logprob(logprob), token_id,
                    self.tm.token_text(token_id) if text else None]

        def top(lp: TokenLogprob | None) -> list | None:
            return None if lp is None else [entry(t, v) for t, v in lp.top]

        out: dict[str, list] = {
            "input_token_logprobs": [entry(t, None if lp is None else lp.logprob) for t, lp in prompt],
            "output_token_logprobs": [entry(lp.token_id, lp.logprob) for lp in lps]}
        if self.req.top_logprobs_num:
            out |= {"input_top_logprobs": [top(lp) for _, lp in prompt],
                    "output_top_logprobs": [top(lp) for lp in lps]}
        return out

    async def chunks(self, events: AsyncIterator[ChoiceEvent]) -> AsyncIterator[dict]:
        """The stream of the single choice: the whole output so far after every event."""
        result = ChoiceResult()
        async for ev in events:
            result.add(ev)
            yield self.body(0, result)

