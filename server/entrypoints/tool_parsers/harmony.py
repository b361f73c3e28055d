"""gpt-oss's harmony format, read from the text (special tokens kept): the answer is a run of messages
``<|start|>assistant<|channel|>CHANNEL [to=RECIPIENT] [<|constrain|>json]<|message|>BODY<|end|>`` (the first one's
``<|start|>assistant`` is in the prompt; the last ends with ``<|return|>``, a tool call with ``<|call|>``).

Channels: ``analysis`` is the reasoning, ``final`` the answer, ``commentary`` addressed ``to=functions.NAME`` a tool
call whose body is the JSON arguments. The ``gpt-oss`` reasoning parser takes the analysis messages; this tool
parser takes the calls, and the bodies of the other messages are the content.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from server.entrypoints.tool_parsers.base import ParsedCall, ParsedTools, ToolParser, held_back
from server.entrypoints.tool_parsers.deepseek import normalized

START, CHANNEL, MESSAGE, CONSTRAIN = "<|start|>", "<|channel|>", "<|message|>", "<|constrain|>"
ENDS = ("<|end|>", "<|call|>", "<|return|>")
TOKENS = (START, CHANNEL, MESSAGE, CONSTRAIN, *ENDS)
RECIPIENT = re.compile(r"to=(\S+?)(?=\s|<\||$)")


@dataclass
class HarmonyMessage:
    """One message of the answer: its channel, recipient (``functions.NAME`` for a tool call), body, and whether
    its end token was seen."""

    channel: str
    recipient: str | None
    body: str
    closed: bool


def harmony_messages(text: str, final: bool) -> list[HarmonyMessage]:
    """The messages of ``text``; a message whose header is not whole yet is left out, and the end of an open body
    that may become an end token is held back (unless ``final``). Text without any harmony token is one message
    of no channel."""
    if not any(t in text for t in TOKENS) and not held_back(text, TOKENS):
        return [HarmonyMessage("", None, text, final)]
    out, pos = [], 0
    while pos < len(text):
        m = text.find(MESSAGE, pos)
        if m < 0:
            break
        header = text[pos:m]
        channel = header.split(CHANNEL, 1)[1] if CHANNEL in header else ""
        recipient = RECIPIENT.search(header)
        channel = re.split(r"\s|<\|", channel.strip(), maxsplit=1)[0]
        start = m + len(MESSAGE)
        ends = [(text.find(e, start), e) for e in ENDS]
        ends = [(i, e) for i, e in ends if i >= 0]
        if ends:
            stop, token = min(ends)
            out.append(HarmonyMessage(channel, recipient.group(1) if recipient else None, text[start:stop], True))
            pos = stop + len(token)
        else:
            body = text[start:]
            if not final:
                body = body[: len(body) - held_back(body, TOKENS)]
            out.append(HarmonyMessage(channel, recipient.group(1) if recipient else None, body, final))
            break
    return out


def harmony_content(messages: list[HarmonyMessage]) -> str:
    """The answer's text: bodies of messages that are neither reasoning nor tool calls."""
    return "".join(m.body for m in messages if m.channel != "analysis" and not _is_call(m))


def _is_call(m: HarmonyMessage) -> bool:
    return m.recipient is not None and m.recipient.startswith("functions.")


class HarmonyToolParser(ToolParser):
    """Tool calls of gpt-oss (commentary messages to ``functions.NAME``)."""

    name = "gpt-oss"
    markers = TOKENS
    detect = ("<|channel|>",)
    special_tokens = True

    def parse(self, text: str, final: bool) -> ParsedTools:
        messages = harmony_messages(text, final)
        calls = [ParsedCall(m.recipient.removeprefix("functions."), normalized(m.body) if m.closed else None)
                 for m in messages if _is_call(m)]
        return ParsedTools(harmony_content(messages), calls)
