"""The merged column layer's row groups and the MLP's SP split, on one process (no collectives: sp_size 1 groups
are checked through their layout; the SP split itself runs over real ranks in tests/parity/test_sp_tp.py)."""

from __future__ import annotations

import pytest
import torch

from server.layers.linear import MergedColumnParallelLinear
from server.models.common import GatedMLP
from server.sp.groups import ParallelState


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_row_groups_hold_every_part_group_by_group(groups: int) -> None:
    torch.manual_seed(0)
    hidden, inter = 12, 8
    gate, up = torch.randn(inter, hidden), torch.randn(inter, hidden)
    layer = MergedColumnParallelLinear(hidden, [inter, inter], ParallelState(), groups=groups)
    layer.weight_loader(layer.weight, gate, 0)
    layer.weight_loader(layer.weight, up, 1)
    g = inter // groups
    for i in range(groups):  # group i: rows [i g, (i+1) g) of gate, then of up
        block = layer.weight[2 * i * g : 2 * (i + 1) * g]
        torch.testing.assert_close(block, torch.cat([gate[i * g : (i + 1) * g], up[i * g : (i + 1) * g]]),
                                   rtol=0, atol=0)


def test_row_groups_need_equal_parts_they_divide() -> None:
    with pytest.raises(ValueError, match="row groups"):
        MergedColumnParallelLinear(4, [6, 6], ParallelState(), groups=4)
    with pytest.raises(ValueError, match="row groups"):
        MergedColumnParallelLinear(4, [4, 8], ParallelState(), groups=2)


class _PartialSums(ParallelState):
    """One SP rank's view without the collective: its partial sum is returned for the test to add up."""

    def sp_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize("sp", [2, 4])
def test_grouped_mlp_equals_the_plain_swiglu(sp: int) -> None:
    """The grouped layout (what sp > 1 stores) computes down(silu(gate x) * up x), and every SP rank's share of the
    split form (its partial sum before the all-reduce) adds up to it."""
    torch.manual_seed(1)
    hidden, inter = 16, 24
    w = {"gate": torch.randn(inter, hidden), "up": torch.randn(inter, hidden), "down": torch.randn(hidden, inter)}
    x = torch.randn(5, hidden, dtype=torch.float64)
    expected = (torch.nn.functional.silu(x @ w["gate"].double().T) * (x @ w["up"].double().T)) @ w["down"].double().T
    parts = []
    for r in range(sp):
        mlp = GatedMLP(hidden, inter, _PartialSums(sp_size=sp, sp_rank=r), torch.float64)
        mlp.gate_up_proj.weight_loader(mlp.gate_up_proj.weight, w["gate"], 0)
        mlp.gate_up_proj.weight_loader(mlp.gate_up_proj.weight, w["up"], 1)
        mlp.down_proj.weight_loader(mlp.down_proj.weight, w["down"])
        assert mlp.sp_splittable()
        torch.testing.assert_close(mlp(x, False), expected)
        parts.append(mlp(x, False, sp_split=True))
    torch.testing.assert_close(sum(parts), expected)


def test_an_intermediate_the_sp_ranks_do_not_divide_is_not_split() -> None:
    mlp = GatedMLP(8, 6, ParallelState(sp_size=4), torch.float32)
    assert mlp.groups == 1 and not mlp.sp_splittable()
