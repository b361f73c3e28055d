"""A new layer kind plugs in through its cache spec alone: a toy model whose only token mixer keeps a per-request
state (a running sum of its inputs and their count) runs through the unchanged engine: slots allocated from its
spec, cleared when a request starts, carried across chunked-prefill steps and decode steps, snapshotted and
restored by the prefix cache. Its greedy tokens must equal a full-sequence computation of the same model."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from server import LLM, SamplingParams
from server.layers.cache_spec import CacheLayer, StateSpec
from server.models import loader
from server.models.common import CausalLM
from tests.helpers import prompt


@dataclass
class RunningSum:
    total: torch.Tensor  # [slots, hidden] fp32
    count: torch.Tensor  # [slots, 1] fp32


class RunningMeanMixer(CacheLayer, nn.Module):
    """x_t -> mean of x_1..x_t over the request so far (fp32 state: the sum and the count)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden = hidden

    def cache_spec(self) -> StateSpec:
        return StateSpec(RunningSum, {"total": ((self.hidden,), torch.float32), "count": ((1,), torch.float32)})

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        meta, st = ctx.linear, self.cache
        if meta.zero_slots is not None:
            st.total[meta.zero_slots] = 0
            st.count[meta.zero_slots] = 0
        assert not meta.split, "the toy layer runs at sp = 1"
        out = torch.zeros_like(x)
        if meta.local_rows is None:
            return out
        cu = meta.local_cu.tolist()
        for i, slot in enumerate(meta.local_slots.tolist()):
            rows = meta.local_rows[cu[i] : cu[i + 1]]
            h = x[rows].float()
            run = st.total[slot] + h.cumsum(0)
            n = st.count[slot] + torch.arange(1, len(rows) + 1, dtype=torch.float32).unsqueeze(1)
            out[rows] = (run / n).to(x.dtype)
            st.total[slot] = run[-1]
            st.count[slot] = n[-1]
        return out


class ToyForCausalLM(CausalLM):
    """Embedding -> running mean -> final norm -> LM head."""

    def __init__(self, cfg, pstate, dtype):
        super().__init__(cfg, pstate, dtype)
        self.layers = nn.ModuleList([ToyBlock(cfg.hidden_size)])

    def load_weights(self, weights) -> None:
        raise NotImplementedError("random weights only")


class ToyBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.mixer = RunningMeanMixer(hidden)

    def forward(self, x, ctx):
        return self.mixer(x, ctx)


def reference_greedy(model: ToyForCausalLM, ids: list[int], new: int) -> list[int]:
    """Full-sequence recomputation every token: the mean over the whole sequence, no state."""
    ids = list(ids)
    out = []
    for _ in range(new):
        h = model.embed_tokens.weight[torch.tensor(ids)].float()
        mean = h.cumsum(0)[-1] / len(ids)
        logits = model.compute_logits(model.norm(mean[None].to(h.dtype)))[0]
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


def test_toy_layer_kind_runs_through_the_engine(tmp_path, monkeypatch):
    monkeypatch.setitem(loader.MODEL_CLASSES, "ToyForCausalLM", ToyForCausalLM)
    path = str(tmp_path / "toy")
    os.makedirs(path)
    cfg = {"architectures": ["ToyForCausalLM"], "vocab_size": 97, "hidden_size": 24, "num_hidden_layers": 1,
           "num_attention_heads": 1, "max_position_embeddings": 512, "rms_norm_eps": 1e-6}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    doc = prompt(70, vocab=97)
    prompts = [doc + prompt(5, vocab=97, seed=s) for s in range(3)] + [prompt(9, vocab=97, seed=9)]
    with LLM(path, load_format="dummy", chunked_prefill_size=16, seed=3) as llm:
        first = llm.generate(prompts[:1], greedy)
        rest = llm.generate(prompts[1:], greedy)  # prefix-cache hits on the document restore its snapshot
        model = llm.engine.runner.model
        assert any(o.cached_tokens > 0 for o in rest), "the prefix cache served no state snapshot"
        for p, o in zip(prompts, first + rest):
            assert o.token_ids == reference_greedy(model, p, 6)
