"""vLLM's ``POST /tokenize`` and ``POST /detokenize`` (benchmark clients use them to align prompt lengths).

``/tokenize`` takes ``{"prompt": str, "add_special_tokens": true}`` or ``{"messages": [...],
"add_generation_prompt": true, "continue_final_message": false}`` (rendered with the chat template, exactly as
``/v1/chat/completions`` would), plus ``return_token_strs`` and ``model``; it answers ``{"count", "max_model_len",
"tokens", "token_strs"}`` (``token_strs`` null unless asked). ``/detokenize`` takes ``{"tokens": [ids]}`` and
answers ``{"prompt": text}`` (special tokens included).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from fastapi import Request
from pydantic import Field

from server.entrypoints.protocol import (
    NEUTRAL_ONLY_FIELDS,
    ChatMessage,
    RequestBody,
    chat_generation_prompt,
    chat_messages,
    check_model,
    check_token_ids,
    parse_json_object,
    validate_body,
)
from server.entrypoints.tokenizer_manager import TokenizerManager
from server.sampling_params import TokenId


class TokenizeCompletionRequest(RequestBody):
    """``POST /tokenize`` with a prompt."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(RequestBody):
    # Special tokens come from the chat template alone, as for /v1/chat/completions.
    """``POST /tokenize`` with chat messages (rendered through the chat template)."""

    neutral_only_fields: ClassVar[dict[str, Any]] = NEUTRAL_ONLY_FIELDS | {"add_special_tokens": False}
    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    return_token_strs: bool = False


class DetokenizeRequest(RequestBody):
    """The body of ``POST /detokenize``."""

    model: str | None = None
    tokens: list[TokenId]


class TokenizeServing:
    """``/tokenize`` and ``/detokenize``; ``tm`` holds the tokenizer."""

    def __init__(self, tm: TokenizerManager, served_model_name: str):
        self.tm = tm
        self.model = served_model_name

    async def tokenize(self, request: Request) -> dict:
        obj = parse_json_object(await request.body())
        req = validate_body(obj, TokenizeChatRequest if "messages" in obj else TokenizeCompletionRequest)
        self.tm.check_available()
        check_model(req.model, self.model)
        if isinstance(req, TokenizeChatRequest):
            ids = await self.tm.encode_chat(chat_messages(req.messages), *chat_generation_prompt(
                req.add_generation_prompt, req.continue_final_message))
        else:
            ids = await self.tm.encode(req.prompt, req.add_special_tokens)
        strs = [self.tm.tokenizer.id_to_token(t) for t in ids] if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.tm.max_model_len, "tokens": ids, "token_strs": strs}

    async def detokenize(self, request: Request) -> dict:
        req = validate_body(parse_json_object(await request.body()), DetokenizeRequest)
        self.tm.check_available()
        check_model(req.model, self.model)
        check_token_ids(req.tokens, self.tm.vocab_size, "tokens")
        return {"prompt": await self.tm.decode(req.tokens, skip_special_tokens=False)}  # as vLLM: all tokens
