"""Sequence-parallel LLM inference server: offline API and engine."""

from server.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "EngineConfig"]


def __getattr__(name):  # keep `import server` light: the engine (and torch) load on first use
    if name == "LLM":
        from server.llm import LLM

        return LLM
    if name == "EngineConfig":
        from server.config import EngineConfig

        return EngineConfig
    raise AttributeError(name)
