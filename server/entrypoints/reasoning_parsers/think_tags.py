"""Reasoning between ``<think>`` and ``</think>`` (or another pair of tags), the form most reasoning models use."""

from __future__ import annotations

from server.entrypoints.reasoning_parsers.base import ReasoningParser


class Qwen3ReasoningParser(ReasoningParser):
    """Qwen3 (and QwQ): the model writes ``<think>`` itself, or the prompt ends with it (the Thinking-2507
    templates); ``enable_thinking: false`` renders a closed, empty block, so the output is all answer."""

    name = "qwen3"


class DeepSeekR1ReasoningParser(ReasoningParser):
    """DeepSeek-R1: the template opens the reasoning, so the output is reasoning until ``</think>``."""

    name = "deepseek-r1"
    default_in_reasoning = True


class DeepSeekV3ReasoningParser(ReasoningParser):
    """DeepSeek-V3.1 / V3.2: thinking only when the template opened it (``thinking: true``)."""

    name = "deepseek-v3"


class Glm45ReasoningParser(ReasoningParser):
    """GLM-4.5 / 4.6: ``<think>`` written by the model; ``enable_thinking: false`` closes it in the prompt."""

    name = "glm45"


class MiniMaxM2ReasoningParser(ReasoningParser):
    """MiniMax-M2: reasoning until ``</think>`` (the opening tag is not written)."""

    name = "minimax-m2"
    default_in_reasoning = True


class KimiReasoningParser(ReasoningParser):
    """Kimi-VL / Kimi thinking models: ``◁think▷`` ... ``◁/think▷``."""

    name = "kimi"
    start, end = "◁think▷", "◁/think▷"


class KimiK2ReasoningParser(ReasoningParser):
    """Kimi-K2-Thinking: ``<think>`` ... ``</think>``."""

    name = "kimi_k2"
