"""DeepSeek-V3 (MLA, with and without a q LoRA) and Kimi-Linear (KDA + MLA) through the real engine on SP x TP gloo
groups against transformers (fp32, CPU).

Every configuration must reproduce transformers' prompt logits (fp32 tolerance) and its exact greedy tokens on
every rank's behalf (rank 0 samples what the group computed). The 301-token prompt is split over SP: MLA layers run
the ring over the zigzag pieces, KDA layers pass their (T, M) chunk maps and the conv halo; decode continues from
the sharded KV and the recurrent and conv states every SP rank holds. Also: the CUDA-graph form of decode run
eagerly, the all-gather modes (latent blocks gathered at once, KDA chunk messages gathered: LASP-2), and prefix-cache
hits (KV pages for MLA, state snapshots for KDA) giving the cache-off tokens.
"""

from __future__ import annotations

import pytest

from server import LLM, SamplingParams
from tests.helpers import assert_matches_reference, prompt, save_tiny_model, transformers_reference

pytestmark = pytest.mark.slow

ARCHS = ("deepseek_v3", "kimi_linear")  # deepseek_v3_nolora: one configuration (its q path is q_proj alone)
LONG = prompt(301)
# grouped routing picks a whole group by the sum of two scores: a prompt whose tokens leave two groups within ~1e-6
# of each other may route differently under another summation order, which is no error; these prompts leave
# margins above 5e-4 on the tiny checkpoints
BATCH = [prompt(301), prompt(13, seed=3), prompt(5, seed=2)]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
ENGINE = dict(device="cpu", sp_min_tokens=8, chunked_prefill_size=260, page_size=8)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt"))
    return {arch: transformers_reference(save_tiny_model(arch, root), LONG, BATCH, GREEDY.max_tokens)
            for arch in (*ARCHS, "deepseek_v3_nolora")}


def check(reference, arch: str, **kw) -> None:
    with LLM(reference[arch][0], **{**ENGINE, **kw}) as llm:
        assert_matches_reference(llm, reference[arch], LONG, BATCH, GREEDY)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sp,tp", [(2, 2), (4, 1), (4, 2)])
def test_sp_tp_matches_single_rank(reference, arch, sp, tp):
    check(reference, arch, sp_size=sp, tp_size=tp)


def test_q_without_lora_matches(reference):
    check(reference, "deepseek_v3_nolora", sp_size=2, tp_size=2)


@pytest.mark.parametrize("arch,sp,tp", [("kimi_linear", 2, 1), ("deepseek_v3", 2, 2)])
def test_decode_in_graph_form_matches(reference, arch, sp, tp):
    """MLA and KDA decode in the CUDA-graph form (static buffers, padded rows), run eagerly."""
    check(reference, arch, sp_size=sp, tp_size=tp, cuda_graph="eager", cuda_graph_max_bs=2)


@pytest.mark.parametrize("arch", ARCHS)
def test_allgather_modes_match(reference, arch):
    """Latent blocks all-gathered instead of passed round the ring; KDA's chunk messages gathered (LASP-2)."""
    check(reference, arch, sp_size=4, ring_mode="allgather", lasp_mode="allgather")


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_cache_hits_give_the_cache_off_tokens(reference, arch):
    """Siblings on one document, one after another at sp = 2: the later ones hit the cache (MLA: the document's
    KV pages, sharded as its prefill left them; KDA: the state snapshot at the end of a prefill chunk) and produce
    the tokens of the cache-off single-rank engine."""
    doc = prompt(150, seed=11)
    prompts = [doc + prompt(n, seed=40 + n) for n in (30, 33, 36)]
    runs = {}
    for sp, cache in ((1, False), (2, True)):
        with LLM(reference[arch][0], **{**ENGINE, "chunked_prefill_size": 48}, sp_size=sp,
                 enable_prefix_cache=cache) as llm:
            outs = [llm.generate([p], GREEDY, use_tqdm=False)[0] for p in prompts]
            runs[cache] = [o.token_ids for o in outs], [o.cached_tokens for o in outs]
    assert runs[True][0] == runs[False][0]
    assert runs[True][1][0] == 0 and all(c >= 48 for c in runs[True][1][1:]), runs[True][1]
