"""Dense weights stored 1/sp per rank (``--shard-dense-weights``): the loaders put each SP rank's rows of its TP slice
in place, checked without processes against the same checkpoint loaded whole at the same layout."""

from __future__ import annotations

import pytest
import torch

from server.models.loader import MODEL_CLASSES, check_model_parallelism, iterate_safetensors, read_model_config
from server.sp.groups import ParallelState
from tests.helpers import save_fp8_model, save_tiny_model


def load(path: str, **layout) -> dict[str, torch.nn.Parameter]:
    cfg = read_model_config(path)
    model = MODEL_CLASSES[cfg.architecture](cfg, ParallelState(**layout), torch.float32)
    model.load_weights(iterate_safetensors(path))
    return dict(model.named_parameters())


# sp = 3 cuts the 64 rows of o_proj and down_proj and the 211-row vocabulary unevenly (the last rank pads)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases, which stay whole
@pytest.mark.parametrize("sp,tp", [(2, 1), (3, 1), (2, 2)])
def test_sp_ranks_rows_make_the_tp_slice(tmp_path, arch, sp, tp):
    path = save_tiny_model(arch, str(tmp_path))
    for tp_rank in range(tp):
        # the same sp: a dense MLP's gate/up row order follows it (GatedMLP's row groups)
        whole = load(path, sp_size=sp, tp_size=tp, tp_rank=tp_rank)
        shards = [load(path, sp_size=sp, tp_size=tp, sp_rank=s, tp_rank=tp_rank, shard_dense_weights=True)
                  for s in range(sp)]
        sharded = [n for n, p in shards[0].items() if hasattr(p, "row_shard")]
        assert {n.rsplit(".", 2)[-2] for n in sharded} == {"embed_tokens", "lm_head", "qkv_proj", "o_proj",
                                                          "gate_up_proj", "down_proj"}
        for name, ref in whole.items():
            parts = [s[name] for s in shards]
            if name not in sharded:
                assert all(torch.equal(p, ref) for p in parts), name
                continue
            assert all(p.shape[0] == -(-ref.shape[0] // sp) for p in parts), name
            assert torch.equal(torch.cat(parts)[: ref.shape[0]], ref), name
            assert not torch.cat(parts)[ref.shape[0]:].any(), name  # padding rows stay zero


def test_fp8_weights_are_not_sharded(tmp_path):
    """An FP8 checkpoint with the option is one error naming the flag before any process starts."""
    fp8, _ = save_fp8_model("llama", str(tmp_path), "channel")
    with pytest.raises(ValueError, match="--shard-dense-weights"):
        check_model_parallelism(fp8, read_model_config(fp8), 1, "auto", shard_dense_weights=True)
    check_model_parallelism(fp8, read_model_config(fp8), 1, "auto")
