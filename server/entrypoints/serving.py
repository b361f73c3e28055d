"""OpenAI ``/v1/completions`` and ``/v1/chat/completions``: a request body becomes choices for the
``TokenizerManager``, whose events become one JSON response or a server-sent-event stream framed as OpenAI
frames it (``data: {json}\\n\\n`` ... ``data: [DONE]``).

Streams follow vLLM: the chunk of a choice's last token also carries its ``finish_reason`` (and that token's
text and logprobs); there is no separate empty finishing chunk.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from server.engine.io_struct import TokenLogprob
from server.entrypoints.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_generation_prompt,
    chat_logprobs,
    chat_messages,
    check_model,
    check_stream_options,
    choice_count,
    completion_logprobs,
    normalize_prompt,
    parse_body,
    sampling_params_for,
)
from server.entrypoints.streaming import CLIENT_CLOSED_REQUEST, clamp_logprob, collect, stream
from server.entrypoints.tokenizer_manager import ChoiceEvent, TokenizerManager


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens``: prompt tokens the prefix cache served."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def prompts_cached(cached: list[int], n: int) -> int:
    """Cached prompt tokens of a request whose choices are ``n`` per prompt: each prompt counted once (its first
    choice), as the prompt tokens are."""
    return sum(cached[::n])


class OpenAIServing:
    """Request handlers shared by the routes; ``tm`` does the engine work."""

    def __init__(self, tm: TokenizerManager, served_model_name: str):
        self.tm = tm
        self.model = served_model_name

    # ---- /v1/completions -------------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        arrival = time.monotonic()
        req = parse_body(await request.body(), CompletionRequest)
        self.tm.check_available()
        check_model(req.model, self.model)
        check_stream_options(req)
        n = choice_count(req.n)
        logprobs = completion_logprobs(req)
        prompts = normalize_prompt(req.prompt, self.tm.vocab_size)
        prompt_ids = [await self.tm.encode(p) for p in prompts]
        ids, params, echo = [], [], []
        for p, p_ids in zip(prompts, prompt_ids, strict=True):
            params += sampling_params_for(req, max_tokens=req.max_tokens, logprobs=logprobs, prompt_len=len(p_ids),
                                          max_model_len=self.tm.max_model_len, n=n, vocab_size=self.tm.vocab_size)
            ids += [p_ids] * n
            text = "" if not req.echo else p if isinstance(p, str) else await self.tm.decode(p)
            echo += [text] * n
        prompt_tokens = sum(len(p) for p in prompt_ids)
        gen = self.tm.submit(ids, params, arrival)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await stream(request, gen, lambda events: self._completion_chunks(
                events, head, echo, logprobs is not None, prompt_tokens, include_usage, n))
        results = await collect(request, gen)
        if results is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        choices = [
            {"index": i, "text": echo[i] + r.text,
             "logprobs": self._completion_logprobs(r.logprobs, len(echo[i])) if logprobs is not None else None,
             "finish_reason": r.finish_reason}
            for i, r in enumerate(results)
        ]
        completion_tokens = sum(r.completion_tokens for r in results)
        cached = prompts_cached([r.cached_tokens for r in results], n)
        return JSONResponse({**head, "choices": choices, "usage": usage(prompt_tokens, completion_tokens, cached)})

    async def _completion_chunks(self, events: AsyncIterator[ChoiceEvent], head: dict, echo: list[str],
                                 with_logprobs: bool, prompt_tokens: int, include_usage: bool, n: int):
        extra = {"usage": None} if include_usage else {}
        offsets = [len(e) for e in echo]
        completion_tokens = [0] * len(echo)
        cached = [0] * len(echo)
        for i, text in enumerate(echo):
            if text:
                yield {**head, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": None}],
                       **extra}
        async for ev in events:
            completion_tokens[ev.index] = ev.completion_tokens
            cached[ev.index] = max(cached[ev.index], ev.cached_tokens)
            if ev.text or ev.logprobs or ev.finish_reason:
                lp = self._completion_logprobs(ev.logprobs or [], offsets[ev.index]) if with_logprobs else None
                offsets[ev.index] += len(ev.text)
                yield {**head, "choices": [{"index": ev.index, "text": ev.text, "logprobs": lp,
                                            "finish_reason": ev.finish_reason}], **extra}
        if include_usage:
            yield {**head, "choices": [], "usage": usage(prompt_tokens, sum(completion_tokens),
                                                         prompts_cached(cached, n))}

    def _completion_logprobs(self, lps: list[TokenLogprob], offset: int) -> dict:
        """OpenAI's legacy shape: ``top_logprobs`` holds the top ``logprobs`` tokens and always the chosen one
        (so up to ``logprobs + 1`` entries, and the chosen token alone for ``logprobs: 0``)."""
        tokens = [self.tm.token_text(lp.token_id) for lp in lps]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        tops = []
        for lp, token in zip(lps, tokens, strict=True):
            top = {self.tm.token_text(t): clamp_logprob(v) for t, v in lp.top}
            tops.append({**top, token: clamp_logprob(lp.logprob)})
        return {"tokens": tokens, "token_logprobs": [clamp_logprob(lp.logprob) for lp in lps], "top_logprobs": tops,
                "text_offset": offsets}

    # ---- /v1/chat/completions --------------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        arrival = time.monotonic()
        req = parse_body(await request.body(), ChatCompletionRequest)
        self.tm.check_available()
        check_model(req.model, self.model)
        check_stream_options(req)
        n = choice_count(req.n)
        logprobs = chat_logprobs(req)
        prompt_ids = await self.tm.encode_chat(chat_messages(req.messages), *chat_generation_prompt(
            req.add_generation_prompt, req.continue_final_message))
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = sampling_params_for(req, max_tokens=max_tokens, logprobs=logprobs, prompt_len=len(prompt_ids),
                                     max_model_len=self.tm.max_model_len, n=n, vocab_size=self.tm.vocab_size)
        gen = self.tm.submit([prompt_ids] * n, params, arrival)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            chunk_head = {**head, "object": "chat.completion.chunk"}
            return await stream(request, gen, lambda events: self._chat_chunks(
                events, chunk_head, n, logprobs is not None, len(prompt_ids), include_usage))
        results = await collect(request, gen)
        if results is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        choices = [
            {"index": i, "message": {"role": "assistant", "content": r.text},
             "logprobs": self.chat_logprobs(r.logprobs) if logprobs is not None else None,
             "finish_reason": r.finish_reason}
            for i, r in enumerate(results)
        ]
        completion_tokens = sum(r.completion_tokens for r in results)
        return JSONResponse({**head, "choices": choices,
                             "usage": usage(len(prompt_ids), completion_tokens, results[0].cached_tokens)})

    async def _chat_chunks(self, events: AsyncIterator[ChoiceEvent], head: dict, n: int, with_logprobs: bool,
                           prompt_tokens: int, include_usage: bool):
        extra = {"usage": None} if include_usage else {}

        def chunk(index: int, delta: dict, logprobs=None, finish_reason=None) -> dict:
            return {**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish_reason}], **extra}

        completion_tokens = [0] * n
        cached = 0
        for i in range(n):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for ev in events:
            completion_tokens[ev.index] = ev.completion_tokens
            if ev.index == 0:
                cached = max(cached, ev.cached_tokens)
            if ev.text or ev.logprobs or ev.finish_reason:
                lp = self.chat_logprobs(ev.logprobs or []) if with_logprobs else None
                yield chunk(ev.index, {"content": ev.text} if ev.text else {}, lp, ev.finish_reason)
        if include_usage:
            yield {**head, "choices": [], "usage": usage(prompt_tokens, sum(completion_tokens), cached)}

    def chat_logprobs(self, lps: list[TokenLogprob]) -> dict:
        """OpenAI's chat shape; ``bytes`` are the token's own bytes (part of a UTF-8 character for some
        byte-level tokens, whose ``token`` text is then U+FFFD)."""
        def entry(token_id: int, logprob: float) -> dict:
            return {"token": self.tm.token_text(token_id), "logprob": clamp_logprob(logprob),
                    "bytes": list(self.tm.token_bytes(token_id))}

        content = [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps]
        return {"content": content, "refusal": None}
