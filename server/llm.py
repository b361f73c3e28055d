"""Offline API: ``LLM(...).generate(prompts, SamplingParams(...))`` and ``LLM(...).chat(messages, ...)`` on the
same engine the server uses."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from server.config import EngineConfig
from server.engine.engine import Engine
from server.messages import GenerateRequest, PromptTokenLogprob, TokenLogprob
from server.sampling_params import SamplingParams
from server.tokenizer import IncrementalDetokenizer, Tokenizer, text_delta


@dataclass
class CompletionOutput:
    """One finished request: generated ``text`` and ``token_ids``, ``finish_reason`` ("stop" or "length"; "error"
    with ``error`` saying what ended it), per-token ``logprobs`` and ``prompt_logprobs`` (None for the first prompt
    token) when asked.

    ``outputs``: every completion of the prompt (``SamplingParams.n`` of them, this one first), as vLLM's
    ``RequestOutput.outputs``."""

    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[PromptTokenLogprob | None] | None = None
    ttft_s: float | None = None
    cached_tokens: int = 0  # prompt tokens served by the prefix cache
    error: str | None = None  # why the engine ended this request, when finish_reason is "error"
    outputs: list[CompletionOutput] = field(default_factory=list, repr=False)

    def __str__(self) -> str:
        return f"{self.prompt or ''}{self.text}"


@dataclass
class _Pending:
    out: CompletionOutput
    detok: object | None
    pieces: list[str] = field(default_factory=list)


class LLM:
    """Loads a model (``model_path=None``: the built-in model, random weights) on ``device`` with ``sp_size x
    tp_size`` ranks. ``model_path`` is a Hugging Face model directory or a model id on the Hub (``revision``: its
    branch, tag or commit; see ``server/models/hub.py``).

    Extra keyword arguments are :class:`server.config.EngineConfig` fields (``page_size``,
    ``chunked_prefill_size``, ``sp_min_tokens``, ``ring_mode``, ``lasp_mode``, ...).
    """

    def __init__(self, model_path: str | None = None, device: str = "auto", dtype: str = "auto",
                 load_format: str = "auto", sp_size: int = 1, tp_size: int = 1, revision: str | None = None,
                 **kwargs):
        if model_path is not None and not os.path.isdir(model_path):
            from server.models.hub import resolve_model_path

            model_path = resolve_model_path(model_path, revision, flag="model_path")
        self.config = EngineConfig(model_path=model_path, device=device, dtype=dtype, load_format=load_format,
                                   sp_size=sp_size, tp_size=tp_size, **kwargs)
        self.engine = Engine(self.config)
        self.tokenizer = None
        try:
            self.tokenizer = Tokenizer.from_pretrained(self.engine.tokenizer_path)
        except (ValueError, OSError):
            pass  # token-id prompts still work (dummy benchmark models ship no tokenizer)
        self._ids = itertools.count()

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[CompletionOutput]:
        """``prompts``: a string, a list of strings, a list of token ids, or a list of token-id lists.
        Returns one :class:`CompletionOutput` per prompt, in order; with ``n > 1`` its ``outputs`` hold all ``n``."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        expanded = [(prompt, one) for prompt, sp in zip(prompts, params) for one in sp.completions()]
        outs = self._run([p for p, _ in expanded], [sp for _, sp in expanded], use_tqdm)
        firsts = []
        for sp in params:
            group, outs = outs[:sp.n], outs[sp.n:]
            group[0].outputs = group
            firsts.append(group[0])
        return firsts

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = True, *,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict[str, Any] | None = None
             ) -> list[CompletionOutput]:
        """Generate replies to one conversation (a list of ``{"role", "content"}`` messages) or to a list of them,
        formatted with the model's chat template (or ``chat_template``, a jinja string), as vLLM's ``LLM.chat``.
        ``chat_template_kwargs`` are extra template variables (``{"enable_thinking": False}``). Message content is
        encoded as text: a control-token string in it does not become a control token. One
        :class:`CompletionOutput` per conversation (its ``prompt``: the rendered conversation)."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer files, so it has no chat template; use generate()")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        extra = {**(chat_template_kwargs or {}), **({"chat_template": chat_template} if chat_template else {})}
        texts, ids = [], []
        for conversation in conversations:
            texts.append(self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt, continue_final_message=continue_final_message, **extra))
            ids.append(self.tokenizer.encode_chat(conversation, add_generation_prompt,
                                                  continue_final_message=continue_final_message, **extra))
        outs = self.generate(ids, sampling_params, use_tqdm)
        for out, text in zip(outs, texts):
            for o in out.outputs:
                o.prompt = text
        return outs

    def _run(self, prompts: list, params: list[SamplingParams], use_tqdm: bool) -> list[CompletionOutput]:
        """One request per prompt (each ``n == 1``) until all are finished; their outputs, in order."""
        pending: dict[str, _Pending] = {}
        order = []
        for prompt, sp in zip(prompts, params):
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ValueError("this model has no tokenizer files; pass token-id lists as prompts")
                ids, text = self.tokenizer.encode(prompt), prompt
            else:
                ids, text = list(prompt), None
            rid = f"offline-{next(self._ids)}"
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, stop=sp.stop, skip_special_tokens=sp.skip_special_tokens)
            pending[rid] = _Pending(CompletionOutput(text, ids, "", [], None,
                                                     [] if sp.logprobs is not None else None), detok)
            self.engine.add_request(GenerateRequest(rid, ids, sp))
            order.append(rid)
        bar = tqdm(total=len(order), desc="generate", disable=not use_tqdm or len(order) < 2)
        remaining = set(order)
        while remaining:
            for o in self.engine.step():
                if o.rid not in remaining:
                    continue
                p = pending[o.rid]
                p.out.token_ids.extend(o.new_token_ids)
                if o.ttft_s is not None:
                    p.out.ttft_s = o.ttft_s
                p.out.cached_tokens = max(p.out.cached_tokens, o.cached_tokens)
                if o.prompt_logprobs is not None:
                    p.out.prompt_logprobs = o.prompt_logprobs
                if o.new_logprobs and p.out.logprobs is not None:
                    p.out.logprobs.extend(o.new_logprobs)
                if p.detok is not None:
                    delta = text_delta(p.detok, o.new_token_ids, o.finished, o.finish_reason, o.matched_stop)
                    p.pieces.append(delta.text)
                    if delta.abort:
                        self.engine.abort_request(o.rid)
                        o.finished = True
                    if delta.finish_reason:
                        o.finish_reason = delta.finish_reason
                if o.finished:
                    if p.detok is not None:
                        p.out.text = "".join(p.pieces)
                    p.out.finish_reason, p.out.error = o.finish_reason, o.error
                    remaining.discard(o.rid)
                    bar.update(1)
        bar.close()
        return [pending[r].out for r in order]

    def start_profile(self, output_dir: str | None = None, record_shapes: bool = False,
                      num_steps: int | None = None) -> str:
        """Profile every rank (``torch.profiler``) from now until :meth:`stop_profile` (or for ``num_steps`` engine
        steps); the output directory (``output_dir``, or the ``profile_dir`` the LLM was made with)."""
        return self.engine.start_profile(output_dir, record_shapes, num_steps)

    def stop_profile(self) -> list[dict]:
        """Stop profiling: every rank writes ``{tag}-rank{r}.trace.json.gz`` and ``.ops.txt`` into the output
        directory; their paths, ``device_ms`` and ``host_op_ms`` (or ``error``), by rank."""
        return self.engine.stop_profile()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
