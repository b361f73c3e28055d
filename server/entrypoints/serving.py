"""OpenAI ``/v1/completions`` and ``/v1/chat/completions``: a request body becomes choices for the
``TokenizerManager``, whose events become one JSON response or a server-sent-event stream framed as OpenAI
frames it (``data: {json}\\n\\n`` ... ``data: [DONE]``).

Streams follow vLLM: the chunk of a choice's last token also carries its ``finish_reason`` (and that token's
text and logprobs); there is no separate empty finishing chunk.

Prompt logprobs: ``echo`` with ``logprobs`` puts the prompt's tokens first in the legacy logprobs (null for the first
token, which follows nothing; a stream's echo chunk carries them); vLLM's ``prompt_logprobs`` is each completion
choice's ``prompt_logprobs``, and for chat the response's (the choices share the prompt), and is refused with
``stream`` as vLLM refuses it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from server.entrypoints.chat_output import ChatOutput, ChatOutputConfig, finish_reason
from server.entrypoints.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_generation_prompt,
    chat_logprobs,
    chat_messages,
    check,
    check_model,
    check_prompt_logprobs,
    check_stream_options,
    choice_count,
    completion_prompt_logprobs,
    normalize_prompt,
    parse_body_off_loop,
    sampling_params_for,
    truncate_prompt,
)
from server.entrypoints.reasoning_parsers import ReasoningParser, reasoning_parser_class
from server.entrypoints.streaming import CLIENT_CLOSED_REQUEST, clamp_logprob, collect, stream
from server.entrypoints.tokenizer_manager import ChoiceEvent, TokenizerManager
from server.entrypoints.tool_choice import output_config, structured_for_tools, template_variables
from server.entrypoints.tool_parsers import ToolParser, tool_parser_class
from server.messages import PromptTokenLogprob, TokenLogprob

PROMPT_TAIL_TOKENS = 16  # enough of the rendered prompt to see whether it opens or closes the reasoning


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens``: prompt tokens the prefix cache served."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def prompts_cached(cached: list[int], n: int) -> int:
    """Cached prompt tokens of a request whose choices are ``n`` per prompt: each prompt counted once (its first
    choice), as the prompt tokens are."""
    return sum(cached[::n])


def stop_fields(matched_stop: str | int | None, eos_token_ids: list[int]) -> dict:
    """What ended a choice, as SGLang (``matched_stop``: the stop string or token id, EOS included) and vLLM
    (``stop_reason``: the stop string or stop token id, null for EOS) report it."""
    return {"matched_stop": matched_stop, "stop_reason": None if matched_stop in eos_token_ids else matched_stop}


class OpenAIServing:
    """Request handlers shared by the routes; ``tm`` does the engine work."""

    def __init__(self, tm: TokenizerManager, served_model_name: str):
        self.tm = tm
        self.model = served_model_name
        self._parsers: tuple[type[ToolParser] | None, type[ReasoningParser] | None] | None = None

    def parsers(self) -> tuple[type[ToolParser] | None, type[ReasoningParser] | None]:
        """The tool-call and reasoning parser classes the server's flags name (``auto`` resolved against the chat
        template once the tokenizer is loaded)."""
        if self._parsers is None:
            args = self.tm.args
            tools = None
            if args.tool_call_parser is not None:
                tools = tool_parser_class(args.tool_call_parser, self.tm.tokenizer.chat_template)
            reasoning = reasoning_parser_class(args.reasoning_parser) if args.reasoning_parser else None
            self._parsers = (tools, reasoning)
        return self._parsers

    def token_name(self, token_id: int, as_id: bool) -> str:
        """A token in logprobs: its text, or vLLM's ``token_id:{id}`` (``return_tokens_as_token_ids``)."""
        return f"token_id:{token_id}" if as_id else self.tm.token_text(token_id)

    # ---- /v1/completions -------------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        arrival = time.monotonic()
        req = await parse_body_off_loop(await request.body(), CompletionRequest)
        self.tm.check_available()
        check_model(req.model, self.model)
        check_stream_options(req)
        check_prompt_logprobs(req)
        n = choice_count(req.n)
        prompts = normalize_prompt(req.prompt, self.tm.vocab_size)
        prompt_ids = [truncate_prompt(await self.tm.encode(p), req.truncate_prompt_tokens, self.tm.max_model_len)
                      for p in prompts]
        ids, params, echo = [], [], []
        for p, p_ids in zip(prompts, prompt_ids, strict=True):
            max_tokens = req.max_tokens if req.max_tokens is not None else self.tm.default_max_tokens(len(p_ids))
            params += sampling_params_for(req, max_tokens=max_tokens, logprobs=req.logprobs,
                                          prompt_logprobs=completion_prompt_logprobs(req), prompt_len=len(p_ids),
                                          max_model_len=self.tm.max_model_len, n=n, vocab_size=self.tm.vocab_size)
            ids += [p_ids] * n
            text = "" if not req.echo else p if isinstance(p, str) else await self.tm.decode(p)
            echo += [text] * n
        prompt_tokens = sum(len(p) for p in prompt_ids)
        gen = self.tm.submit(ids, params, arrival)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model}
        if req.stream:
            return await stream(request, gen, lambda events: self._completion_chunks(
                events, head, req, ids, echo, prompt_tokens, n))
        results = await collect(request, gen)
        if results is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        choices = []
        for i, r in enumerate(results):
            lp = None
            if req.logprobs is not None:
                lp = self._completion_logprobs([(x.token_id, x) for x in r.logprobs], len(echo[i]), top_n(req),
                                               bool(req.return_tokens_as_token_ids))
                if req.echo:
                    lp = self._echo_logprobs(ids[i], r.prompt_logprobs, req.logprobs, lp,
                                             bool(req.return_tokens_as_token_ids))
            choice = {"index": i, "text": echo[i] + r.text, "logprobs": lp, "finish_reason": r.finish_reason,
                      **stop_fields(r.matched_stop, self.tm.tokenizer.eos_token_ids)}
            if req.return_token_ids:
                choice |= {"prompt_token_ids": ids[i], "token_ids": r.token_ids}
            if req.prompt_logprobs is not None:
                choice["prompt_logprobs"] = self.prompt_logprobs(r.prompt_logprobs, req.prompt_logprobs)
            choices.append(choice)
        completion_tokens = sum(r.completion_tokens for r in results)
        cached = prompts_cached([r.cached_tokens for r in results], n)
        return JSONResponse({**head, "choices": choices, "usage": usage(prompt_tokens, completion_tokens, cached)})

    async def _completion_chunks(self, events: AsyncIterator[ChoiceEvent], head: dict, req: CompletionRequest,
                                 ids: list[list[int]], echo: list[str], prompt_tokens: int, n: int):
        """A choice's echoed prompt is its first chunk, sent with its first token's event (which brings the
        prompt's logprobs), then that token's chunk. Text offsets advance by the tokens' texts, as in a whole
        response. With ``return_token_ids`` (vLLM's) a choice's first chunk carries ``prompt_token_ids`` and every
        chunk the ``token_ids`` it adds, so every token has a chunk even where its text is still held back. With
        ``stream_options.continuous_usage_stats`` (vLLM's) every chunk carries the usage so far."""
        usage_mode = stream_usage(req)
        with_ids = bool(req.return_token_ids)
        as_ids = bool(req.return_tokens_as_token_ids)

        def chunk(index: int, text: str, logprobs: dict | None, ev: ChoiceEvent | None = None) -> dict:
            done = ev is not None and ev.finish_reason is not None
            choice = {"index": index, "text": text, "logprobs": logprobs,
                      "finish_reason": ev.finish_reason if done else None}
            if done:
                choice |= stop_fields(ev.matched_stop, self.tm.tokenizer.eos_token_ids)
            if with_ids:
                choice["token_ids"] = (ev.token_ids if ev is not None else None) or []
                if not sent_ids[index]:
                    sent_ids[index] = True
                    choice["prompt_token_ids"] = ids[index]
            return {**head, "choices": [choice], **chunk_usage(usage_mode, prompt_tokens, sum(completion_tokens),
                                                                 prompts_cached(cached, n))}

        offsets = [len(e) for e in echo]
        echoed = [not req.echo] * len(echo)
        sent_ids = [False] * len(echo)
        completion_tokens = [0] * len(echo)
        cached = [0] * len(echo)
        async for ev in events:
            i = ev.index
            completion_tokens[i] = ev.completion_tokens
            cached[i] = max(cached[i], ev.cached_tokens)
            if not echoed[i]:
                echoed[i] = True
                lp = None
                if req.logprobs is not None:
                    lp = self._echo_logprobs(ids[i], ev.prompt_logprobs, req.logprobs, as_ids=as_ids)
                yield chunk(i, echo[i], lp)
            if ev.text or ev.logprobs or ev.finish_reason or (with_ids and ev.token_ids):
                lp = None
                if req.logprobs is not None:
                    lp = self._completion_logprobs([(x.token_id, x) for x in ev.logprobs or []], offsets[i],
                                                   top_n(req), as_ids)
                    offsets[i] += sum(len(t) for t in lp["tokens"])  # as in a whole response, whatever the
                    # detokenizer holds back (part of a character)
                yield chunk(i, ev.text, lp, ev)
        if usage_mode:
            yield {**head, "choices": [], "usage": usage(prompt_tokens, sum(completion_tokens),
                                                         prompts_cached(cached, n))}

    def _completion_logprobs(self, tokens: list[tuple[int, TokenLogprob | None]], offset: int, top_n: int,
                             as_ids: bool = False) -> dict:
        """OpenAI's legacy shape over ``(token id, its logprob)`` pairs starting at character ``offset``:
        ``top_logprobs`` holds the top ``top_n`` tokens and always the chosen one (so up to ``top_n + 1`` entries,
        and the chosen token alone for ``logprobs: 0``); a token without a logprob (the first of an echoed prompt)
        has null for both. ``as_ids``: tokens named ``token_id:{id}`` (vLLM's ``return_tokens_as_token_ids``)."""
        texts = [self.token_name(t, as_ids) for t, _ in tokens]
        offsets = []
        for t in texts:
            offsets.append(offset)
            offset += len(t)
        tops: list[dict | None] = []
        for (_, lp), text in zip(tokens, texts, strict=True):
            top = None
            if lp is not None:
                top = {self.token_name(t, as_ids): clamp_logprob(v) for t, v in lp.top[:top_n]}
                top[text] = clamp_logprob(lp.logprob)
            tops.append(top)
        return {"tokens": texts, "token_logprobs": [None if lp is None else clamp_logprob(lp.logprob)
                                                    for _, lp in tokens],
                "top_logprobs": tops, "text_offset": offsets}

    def _echo_logprobs(self, prompt_ids: list[int], prompt_logprobs: list[PromptTokenLogprob | None], top_n: int,
                       then: dict | None = None, as_ids: bool = False) -> dict:
        """The legacy logprobs of an echoed prompt (offsets from 0), followed by ``then`` (the completion's)."""
        lp = self._completion_logprobs(list(zip(prompt_ids, prompt_logprobs, strict=True)), 0, top_n, as_ids)
        return {key: lp[key] + then[key] for key in lp} if then is not None else lp

    def prompt_logprobs(self, lps: list[PromptTokenLogprob | None], top_n: int) -> list[dict | None]:
        """vLLM's ``prompt_logprobs``: per prompt token null (the first) or ``{"token id": {"logprob", "rank",
        "decoded_token"}}`` for the token itself and its top ``top_n`` alternatives (ranked 1..top_n)."""
        def entry(token_id: int, logprob: float, rank: int) -> dict:
            return {"logprob": clamp_logprob(logprob), "rank": rank, "decoded_token": self.tm.token_text(token_id)}

        out: list[dict | None] = []
        for lp in lps:
            if lp is None:
                out.append(None)
                continue
            tokens = {str(lp.token_id): entry(lp.token_id, lp.logprob, lp.rank)}
            for rank, (t, v) in enumerate(lp.top[:top_n], start=1):
                tokens.setdefault(str(t), entry(t, v, rank))
            out.append(tokens)
        return out

    # ---- /v1/chat/completions --------------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        arrival = time.monotonic()
        req = await parse_body_off_loop(await request.body(), ChatCompletionRequest)
        self.tm.check_available()
        check_model(req.model, self.model)
        check_stream_options(req)
        check_prompt_logprobs(req)
        n = choice_count(req.n)
        logprobs = chat_logprobs(req)
        messages = chat_messages(req.messages)
        prompt_ids = await self.tm.encode_chat(messages, *chat_generation_prompt(
            req.add_generation_prompt, req.continue_final_message), **template_variables(req))
        prompt_ids = truncate_prompt(prompt_ids, req.truncate_prompt_tokens, self.tm.max_model_len)
        tool_cls, reasoning_cls = self.parsers()
        config = output_config(req, reasoning_cls() if reasoning_cls else None,
                               tool_cls([t.model_dump(exclude_none=True) for t in req.tools or []]) if tool_cls
                               else None,
                               await self.tm.decode(prompt_ids[-PROMPT_TAIL_TOKENS:], skip_special_tokens=False),
                               tuple(self.tm.tokenizer.control_tokens))
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            max_tokens = self.tm.default_max_tokens(len(prompt_ids))
        params = sampling_params_for(req, max_tokens=max_tokens, logprobs=logprobs,
                                     prompt_logprobs=req.prompt_logprobs, prompt_len=len(prompt_ids),
                                     max_model_len=self.tm.max_model_len, n=n, vocab_size=self.tm.vocab_size)
        structured = structured_for_tools(req, config)
        forced = json.dumps(req.tool_choice) if isinstance(req.tool_choice, str) else "a named function"
        check(structured is None or all(p.structured is None for p in params), "tool_choice",
              f"'tool_choice': {forced} constrains the output to a tool call; it cannot be combined with another "
              "constraint (response_format, structured_outputs or guided_*): one constraint per request.")
        for p in params:
            p.structured = structured or p.structured
            if config.control_tokens:  # the parsers read the format's special tokens
                p.skip_special_tokens = False
        gen = self.tm.submit([prompt_ids] * n, params, arrival)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model}
        # vLLM's echo: the answer continues the last message when that is the assistant's
        echo = messages[-1]["content"] if req.echo and messages[-1]["role"] == "assistant" else ""
        echo = echo if isinstance(echo, str) else "\n".join(p["text"] for p in echo)
        as_ids = bool(req.return_tokens_as_token_ids)
        if req.stream:
            chunk_head = {**head, "object": "chat.completion.chunk"}
            return await stream(request, gen, lambda events: self._chat_chunks(
                events, chunk_head, req, n, config, prompt_ids, echo))
        results = await collect(request, gen)
        if results is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        choices = []
        for i, r in enumerate(results):
            message = ChatOutput(config).message(r.text)
            if echo:
                message["content"] = echo + (message["content"] or "")
            choices.append({
                "index": i, "message": message,
                "logprobs": self.chat_logprobs(r.logprobs, as_ids) if logprobs is not None else None,
                "finish_reason": finish_reason(r.finish_reason, "tool_calls" in message),
                **stop_fields(r.matched_stop, self.tm.tokenizer.eos_token_ids),
                **({"token_ids": r.token_ids} if req.return_token_ids else {})})
        completion_tokens = sum(r.completion_tokens for r in results)
        cached = results[0].cached_tokens
        body = {**head, "choices": choices, "usage": usage(len(prompt_ids), completion_tokens, cached)}
        if req.prompt_logprobs is not None:  # vLLM's place for chat: the response's, as the choices share the prompt
            body["prompt_logprobs"] = self.prompt_logprobs(results[0].prompt_logprobs, req.prompt_logprobs)
        if req.return_token_ids:  # vLLM's places: the prompt's ids on the response, each choice's own on it
            body["prompt_token_ids"] = prompt_ids
        return JSONResponse(body)

    async def _chat_chunks(self, events: AsyncIterator[ChoiceEvent], head: dict, req: ChatCompletionRequest, n: int,
                           config: ChatOutputConfig, prompt_ids: list[int], echo: str):
        """Each choice's text goes through its :class:`ChatOutput`, so reasoning, content and tool calls are
        separate deltas. With ``return_token_ids`` (vLLM's) the first chunk carries ``prompt_token_ids`` and every
        choice chunk the ``token_ids`` it adds, so every token has a chunk even while its text is held back; with
        ``stream_options.continuous_usage_stats`` every chunk carries the usage so far; with ``echo`` the first
        chunk of a choice carries the echoed content."""
        usage_mode = stream_usage(req)
        with_ids = bool(req.return_token_ids)
        with_logprobs = req.logprobs is not None and bool(req.logprobs)
        as_ids = bool(req.return_tokens_as_token_ids)
        outputs = [ChatOutput(config) for _ in range(n)]
        completion_tokens = [0] * n
        cached = 0

        def chunk(index: int, delta: dict, logprobs=None, ev: ChoiceEvent | None = None) -> dict:
            done = ev is not None and ev.finish_reason is not None
            reason = finish_reason(ev.finish_reason, outputs[index].has_calls) if done else None
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            if done:
                choice |= stop_fields(ev.matched_stop, self.tm.tokenizer.eos_token_ids)
            if with_ids:
                choice["token_ids"] = (ev.token_ids if ev is not None else None) or []
            return {**head, "choices": [choice], **chunk_usage(usage_mode, len(prompt_ids), sum(completion_tokens),
                                                                 cached)}

        for i in range(n):
            first = chunk(i, {"role": "assistant", "content": echo})
            yield {**first, "prompt_token_ids": prompt_ids} if with_ids and i == 0 else first
        async for ev in events:
            completion_tokens[ev.index] = ev.completion_tokens
            if ev.index == 0:
                cached = max(cached, ev.cached_tokens)
            delta = outputs[ev.index].delta(ev.text, ev.finish_reason is not None)
            if delta or ev.logprobs or ev.finish_reason or (with_ids and ev.token_ids):
                lp = self.chat_logprobs(ev.logprobs or [], as_ids) if with_logprobs else None
                yield chunk(ev.index, delta, lp, ev)
        if usage_mode:
            yield {**head, "choices": [], "usage": usage(len(prompt_ids), sum(completion_tokens), cached)}

    def chat_logprobs(self, lps: list[TokenLogprob], as_ids: bool = False) -> dict:
        """OpenAI's chat shape; ``bytes`` are the token's own bytes (part of a UTF-8 character for some
        byte-level tokens, whose ``token`` text is then U+FFFD); ``as_ids``: tokens named ``token_id:{id}``."""
        def entry(token_id: int, logprob: float) -> dict:
            return {"token": self.token_name(token_id, as_ids), "logprob": clamp_logprob(logprob),
                    "bytes": list(self.tm.token_bytes(token_id))}

        content = [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps]
        return {"content": content, "refusal": None}


def top_n(req: CompletionRequest) -> int:
    """Alternatives per generated token in a completion's logprobs: ``logprobs``, or each of vLLM's
    ``logprob_token_ids``."""
    return len(req.logprob_token_ids) if req.logprob_token_ids else req.logprobs


def stream_usage(req: ChatCompletionRequest | CompletionRequest) -> str | None:
    """How a stream reports usage: not at all, in a ``final`` chunk (``include_usage``), or also ``continuous``ly in
    every chunk (vLLM's ``continuous_usage_stats``, with ``include_usage``)."""
    opts = req.stream_options
    if opts is None or not opts.include_usage:
        return None
    return "continuous" if opts.continuous_usage_stats else "final"


def chunk_usage(mode: str | None, prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    """The ``usage`` field of a stream's chunk: absent, null, or the usage so far."""
    if mode is None:
        return {}
    return {"usage": usage(prompt_tokens, completion_tokens, cached) if mode == "continuous" else None}
