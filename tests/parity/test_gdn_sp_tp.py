"""Gated DeltaNet hybrids through the real engine on SP x TP gloo groups against the single-rank engine.

Every configuration must reproduce the sp=1 x tp=1 prompt logits (fp32 tolerance, see test_parity) and the exact
greedy tokens. The long prompt (301 tokens, chunked at 260) is split over SP: its first chunk's zigzag pieces
cross the 64-token GDN chunk at sp=2, its tail's pieces are a few tokens at sp=4, and every piece boundary needs
the conv halo of the piece before it (on another rank, or the conv state after the first chunk). The 13-token
prompt is split too, into pieces shorter than the conv kernel at sp=4. Decode continues from the recurrent and
conv states every SP rank holds.
"""

from __future__ import annotations

import pytest

from server import LLM, SamplingParams
from tests.helpers import assert_matches_reference, prompt, single_rank_reference

pytestmark = pytest.mark.slow

LONG = prompt(301)
BATCH = [prompt(301), prompt(13, seed=1), prompt(5, seed=2)]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
ENGINE = dict(device="cpu", sp_min_tokens=8, chunked_prefill_size=260, page_size=8)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return single_rank_reference(str(tmp_path_factory.mktemp("ckpt")), ("qwen3_5", "qwen3_next"), ENGINE, LONG,
                                 BATCH, GREEDY)


def check(reference, arch: str, **kw) -> None:
    with LLM(reference[arch][0], **{**ENGINE, **kw}) as llm:
        assert_matches_reference(llm, reference[arch], LONG, BATCH, GREEDY)


@pytest.mark.parametrize("sp,tp", [(2, 1), (4, 1), (1, 2), (2, 2), (4, 2)])
def test_sp_tp_matches_single_rank(reference, sp, tp):
    check(reference, "qwen3_5", sp_size=sp, tp_size=tp)


def test_grouped_projections_and_moe_under_sp_tp(reference):
    """Qwen3-Next's per-key-head fused projections and shared-expert MoE, sharded over TP, with LASP-2-style
    all-gathered chunk maps."""
    check(reference, "qwen3_next", sp_size=2, tp_size=2, lasp_mode="allgather")


def test_ring_and_allgather_match(reference):
    check(reference, "qwen3_5", sp_size=4, lasp_mode="allgather")


@pytest.mark.parametrize("arch,sp", [("qwen3_5", 1), ("qwen3_5", 2), ("qwen3_next", 2)])
def test_decode_in_graph_form_matches(reference, arch, sp):
    """GDN decode (conv and recurrent states, padded rows on the scratch slot) in the CUDA-graph form, eagerly."""
    check(reference, arch, sp_size=sp, cuda_graph="eager", cuda_graph_max_bs=2)
