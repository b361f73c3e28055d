"""Reasoning parsers: split a model's text into its reasoning and its answer.

Like the tool-call parsers (:mod:`server.entrypoints.tool_parsers.base`), a reasoning parser's reader reads one
choice's text once, as it arrives, and yields what each piece adds to the reasoning and to the answer; text that
may still be a marker is held back until the next piece or the end decides. ``in_reasoning`` says whether the
output starts inside the reasoning (:meth:`ReasoningParser.starts_in_reasoning`: the prompt may already hold the
opening tag, as DeepSeek-R1's and Qwen3-Thinking-2507's templates write it).
"""

from __future__ import annotations

from dataclasses import dataclass

from server.entrypoints.tool_parsers.base import StreamReader


@dataclass
class ParsedReasoning:
    """A text (or what a piece of text adds) split into reasoning and content (the answer, where tool calls are
    looked for next)."""

    reasoning: str
    content: str


class ReasoningParser:
    """Splits a model's text at its reasoning markers. Subclasses set ``name``, and ``start`` / ``end`` (the
    markers) or override :meth:`reader`; ``default_in_reasoning``: the output starts in the reasoning unless the
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

    def reader(self, in_reasoning: bool) -> ThinkReader:
        """A reader for one choice."""
        return ThinkReader(self.start, self.end, in_reasoning)

    @property
    def end_marker(self) -> str:
        """The text after which the answer starts (a grammar constrains only what follows it)."""
        return self.end


class ThinkReader(StreamReader):
    """Reasoning between ``start`` and ``end`` tags: the output opens it with ``start`` (after whitespace), or
    starts in it (``in_reasoning``); newlines right after ``end`` are not part of the answer."""

    def __init__(self, start: str, end: str, in_reasoning: bool):
        super().__init__()
        self.start, self.end = start, end
        self.state = "reasoning" if in_reasoning else "lead"
        self.thought = ""

    def read(self, text: str, final: bool) -> ParsedReasoning:
        content = self.feed(text, final).content
        thought, self.thought = self.thought, ""
        return ParsedReasoning(thought, content)

    def step(self) -> bool:
        if self.state == "lead":  # does the output open the reasoning?
            lead = self.buf.lstrip()
            if not self.final and (not lead or (len(lead) < len(self.start) and self.start.startswith(lead))):
                return False
            if lead.startswith(self.start):
                self.buf, self.state = lead[len(self.start):], "reasoning"
            else:
                self.state = "answer"
            return True
        if self.state == "reasoning":
            text, mark = self.until((self.end,))
            self.thought += text
            if mark:
                self.state = "after"
            return mark is not None
        if self.state == "after":
            self.buf = self.buf.lstrip("\n")
            if not self.buf and not self.final:
                return False
            self.state = "answer"
            return True
        self.content(self.buf)
        self.buf = ""
        return False
