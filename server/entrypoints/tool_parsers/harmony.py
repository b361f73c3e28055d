"""gpt-oss's harmony format, read from the text (special tokens kept): the answer is a run of messages
``<|start|>assistant<|channel|>CHANNEL [to=RECIPIENT] [<|constrain|>json]<|message|>BODY<|end|>`` (the first one's
``<|start|>assistant`` is in the prompt; the last ends with ``<|return|>``, a tool call with ``<|call|>``).

Channels: ``analysis`` is the reasoning, ``final`` the answer, ``commentary`` addressed ``to=functions.NAME`` a tool
call whose body is the JSON arguments. The ``gpt-oss`` reasoning parser takes the analysis messages; this tool
parser takes the calls, and the bodies of the other messages are the content. Text outside any message (a model
that forgot the framing) is content too.
"""

from __future__ import annotations

import re

from server.entrypoints.tool_parsers.base import ToolParser
from server.entrypoints.tool_parsers.values import RawArguments

START, CHANNEL, MESSAGE, CONSTRAIN = "<|start|>", "<|channel|>", "<|message|>", "<|constrain|>"
ENDS = ("<|end|>", "<|call|>", "<|return|>")
TOKENS = (START, CHANNEL, MESSAGE, CONSTRAIN, *ENDS)
RECIPIENT = re.compile(r"to=(\S+?)(?=\s|<\||$)")


def header_fields(header: str) -> tuple[str, str | None]:
    """A message header's channel and recipient."""
    channel = header.split(CHANNEL, 1)[1] if CHANNEL in header else ""
    channel = re.split(r"\s|<\|", channel.strip(), maxsplit=1)[0]
    recipient = RECIPIENT.search(header)
    return channel, recipient.group(1) if recipient else None


class HarmonyToolParser(ToolParser):
    """Tool calls of gpt-oss (commentary messages to ``functions.NAME``); the analysis messages' bodies are
    collected in ``reasoning`` (what the ``gpt-oss`` reasoning parser returns)."""

    name = "gpt-oss"
    detect = ("<|channel|>",)
    special_tokens = True

    def __init__(self, tools: list[dict] | None = None):
        super().__init__(tools)
        self.header = ""  # the current message's header, from its first token
        self.channel = ""
        self.args: RawArguments | None = None
        self.reasoning = ""

    def step(self) -> bool:
        if self.state == "text":  # between messages: a header
            text, mark = self.until(TOKENS)
            if not self.header:
                self.content(text)  # outside any message
            else:
                self.header += text
            if mark == MESSAGE:
                self._open(self.header)
            elif mark:
                self.header += mark
        else:
            text, mark = self.until(ENDS)
            if self.args is not None:
                self.args.add(text)
            elif self.channel == "analysis":
                self.reasoning += text
            else:
                self.content(text)
            if mark:
                self._close()
        return mark is not None  # after a token, more text may be read

    def _open(self, header: str) -> None:
        self.channel, recipient = header_fields(header)
        self.header, self.state = "", "body"
        if recipient is not None and recipient.startswith("functions."):
            self.start_call(recipient.removeprefix("functions."))
            self.args = RawArguments(self)

    def _close(self) -> None:
        if self.args is not None:
            self.args.end()
            self.args = None
        self.state = "text"

    def finish(self) -> None:
        if self.state == "body":
            self._close()
