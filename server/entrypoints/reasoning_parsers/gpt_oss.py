"""gpt-oss: the reasoning is the ``analysis`` channel of its harmony messages
(:mod:`server.entrypoints.tool_parsers.harmony`); the content keeps the other messages, framing and all, for the
harmony parser that always reads gpt-oss answers (it drops the framing and finds the tool calls)."""

from __future__ import annotations

from server.entrypoints.reasoning_parsers.base import ParsedReasoning, ReasoningParser
from server.entrypoints.tool_parsers.harmony import HarmonyToolParser


class GptOssReasoningParser(ReasoningParser):
    """Harmony's analysis channel as reasoning."""

    name = "gpt-oss"
    special_tokens = True
    content_tool_parser = "gpt-oss"

    def starts_in_reasoning(self, prompt_tail: str, enable_thinking: bool | None) -> bool:
        return False

    def may_reason(self, prompt_tail: str, enable_thinking: bool | None) -> bool:
        return True

    def reader(self, in_reasoning: bool) -> HarmonyReasoningReader:
        return HarmonyReasoningReader()

    @property
    def end_marker(self) -> str:
        return "<|channel|>final<|message|>"


class HarmonyReasoningReader:
    """The analysis messages of one choice as reasoning; the text passes on whole as content."""

    def __init__(self) -> None:
        self.harmony = HarmonyToolParser()

    def read(self, text: str, final: bool) -> ParsedReasoning:
        self.harmony.feed(text, final)
        reasoning, self.harmony.reasoning = self.harmony.reasoning, ""
        return ParsedReasoning(reasoning, text)
