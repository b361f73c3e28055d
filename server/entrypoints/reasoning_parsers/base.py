"""Reasoning parsers: split a model's text into its reasoning and its answer.

Like the tool-call parsers (:mod:`server.entrypoints.tool_parsers.base`), a reasoning parser reads the whole text
generated so far, on every prefix while streaming and once on the whole output, and must be monotone: on a longer
prefix both parts extend the previous ones. ``in_reasoning`` says whether the output starts inside the reasoning
(:meth:`ReasoningParser.starts_in_reasoning`: the prompt may already hold the opening tag, as DeepSeek-R1's and
Qwen3-Thinking-2507's templates write it).
"""

from __future__ import annotations

from dataclasses import dataclass

from server.entrypoints.tool_parsers.base import held_back


@dataclass
class ParsedReasoning:
    """A text split into reasoning and content (the answer, where tool calls are looked for next)."""

    reasoning: str
    content: str


class ReasoningParser:
    """Splits a model's text at its reasoning markers. Subclasses set ``name``, and ``start`` / ``end`` (the
    markers) or override :meth:`parse`; ``default_in_reasoning``: the output starts in the reasoning unless the
    prompt says otherwise (models whose template opens the reasoning for them). ``special_tokens``: the markers are
    special tokens, kept in the detokenized text. ``content_tool_parser``: the tool-call format the content is
    always read with (gpt-oss: its answer is harmony messages, whether or not tools are sent)."""

    name: str = ""
    start: str = "<think>"
    end: str = "</think>"
    default_in_reasoning: bool = False
    special_tokens: bool = False
    content_tool_parser: str | None = None

    def starts_in_reasoning(self, prompt_tail: str, enable_thinking: bool | None) -> bool:
        """Whether the output starts inside the reasoning, from the end of the rendered prompt and the request's
        ``chat_template_kwargs.enable_thinking``."""
        tail = prompt_tail.rstrip()
        if tail.endswith(self.start):
            return True
        if tail.endswith(self.end) or enable_thinking is False:
            return False
        return self.default_in_reasoning

    def may_reason(self, prompt_tail: str, enable_thinking: bool | None) -> bool:
        """Whether the output may hold reasoning at all (not when the prompt closed it or thinking is off)."""
        return not prompt_tail.rstrip().endswith(self.end) and enable_thinking is not False

    def parse(self, text: str, final: bool, in_reasoning: bool) -> ParsedReasoning:
        if not in_reasoning:
            lead = text.lstrip()
            if not final and lead and self.start.startswith(lead) and lead != self.start:
                return ParsedReasoning("", "")  # may still become the opening tag
            if not lead.startswith(self.start):
                return ParsedReasoning("", text)
            text = lead[len(self.start):]
        stop = text.find(self.end)
        if stop < 0:
            return ParsedReasoning(text if final else text[: len(text) - held_back(text, (self.end,))], "")
        return ParsedReasoning(text[:stop], text[stop + len(self.end):].lstrip("\n"))

    @property
    def end_marker(self) -> str:
        """The text after which the answer starts (a grammar constrains only what follows it)."""
        return self.end
