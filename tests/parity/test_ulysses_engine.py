"""``--ulysses-degree`` through the real engine on SP x TP gloo groups against the single-rank engine.

Split chunks are computed on the U x R mesh (softmax: Ulysses x ring over the new tokens, the SP ring over the
cached prefix; lightning and GDN: all-to-all to heads, state passing across ring groups) while the caches keep the
layouts of the plain ring. Every configuration must reproduce the sp=1 prompt logits (fp32 tolerance, see
test_parity) and the exact greedy tokens. The long prompt (150 tokens, 24 per SP rank and step) is split over
several steps, so every later chunk attends to a cached prefix sharded over all SP ranks and continues from the
linear states the previous Ulysses chunk left on every rank; at sp=2 its 6-token tail is replicated. Decode then
runs unchanged from those caches. Head counts: tiny Llama and MiniMax have 4 query and 2 KV heads, so at U=4, and
at tp=2 with U=2, KV heads are replicated; the GDN model gets 8 value heads over 2 key heads (replicated likewise).
"""

from __future__ import annotations

import multiprocessing

import pytest

from server import LLM, SamplingParams
from tests.helpers import assert_logits_close, prompt, save_tiny_model

pytestmark = pytest.mark.slow

LONG = prompt(150)
BATCH = [prompt(150), prompt(5), prompt(40, seed=1)]
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
ENGINE = dict(device="cpu", sp_min_tokens=8, chunked_prefill_size=24, page_size=8)
ARCHS = {"llama": {}, "minimax_7to1": {}, "qwen3_5": dict(linear_num_value_heads=8)}
# (sp, tp, U): Ulysses only (R = 1) with U = 2 and 4, Ulysses x ring (U = 2, R = 2), and with TP
MESHES = [(2, 1, 2), (4, 1, 4), (4, 1, 2), (2, 2, 2)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = {}
    for arch, over in ARCHS.items():
        path = save_tiny_model(arch, str(tmp_path_factory.mktemp(arch)), **over)
        with LLM(path, **ENGINE) as llm:
            out[arch] = (path, llm.engine.prompt_logits(LONG),
                         [o.token_ids for o in llm.generate(BATCH, GREEDY, use_tqdm=False)])
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("sp,tp,ulysses", MESHES)
def test_ulysses_matches_single_rank(reference, arch, sp, tp, ulysses):
    path, logits, tokens = reference[arch]
    with LLM(path, **ENGINE, sp_size=sp, tp_size=tp, ulysses_degree=ulysses) as llm:
        assert_logits_close(llm.engine.prompt_logits(LONG), logits)
        assert [o.token_ids for o in llm.generate(BATCH, GREEDY, use_tqdm=False)] == tokens
        stats = llm.engine.stats()
        assert stats.kv_pages_used == 0 and stats.state_slots_used == 0  # every rank's caches freed


def test_heads_that_do_not_split_fail_before_any_process_starts(tmp_path):
    """The GDN model's 8 value heads are 4 per TP rank at tp=2: not a multiple of U=8 (sp=8)."""
    path = save_tiny_model("qwen3_5", str(tmp_path), **ARCHS["qwen3_5"])
    with pytest.raises(ValueError, match=r"^[^\n]*4 Gated DeltaNet value heads per TP rank .*--tp-size.*"
                                         r"--ulysses-degree=8[^\n]*$"):
        LLM(path, device="cpu", sp_size=8, tp_size=2, ulysses_degree=8)
    assert multiprocessing.active_children() == []
    with pytest.raises(ValueError, match="--ulysses-degree must be >= 1 and divide --sp-size 4, got 3"):
        LLM(path, device="cpu", sp_size=4, ulysses_degree=3)


@pytest.mark.parametrize("arch", ["minimax_7to1", "qwen3_5"])
def test_allgather_modes_match(reference, arch):
    """The prefix by all-gather KV, LASP-2 / all-gathered GDN chunk maps across the ring groups of a 2 x 2 mesh."""
    path, logits, tokens = reference[arch]
    with LLM(path, **ENGINE, sp_size=4, ulysses_degree=2, ring_mode="allgather", lasp_mode="allgather") as llm:
        assert_logits_close(llm.engine.prompt_logits(LONG), logits)
        assert [o.token_ids for o in llm.generate(BATCH, GREEDY, use_tqdm=False)] == tokens


def test_decode_in_graph_form_after_ulysses_prefill(reference):
    """Decode steps in the CUDA-graph form (run eagerly on CPU) read the caches a Ulysses prefill left."""
    path, _, tokens = reference["minimax_7to1"]
    with LLM(path, **ENGINE, sp_size=2, ulysses_degree=2, cuda_graph="eager", cuda_graph_max_bs=4) as llm:
        assert [o.token_ids for o in llm.generate(BATCH, GREEDY, use_tqdm=False)] == tokens


@pytest.mark.parametrize("arch", ["minimax_7to1", "qwen3_5"])
@pytest.mark.parametrize("sp,tp,ulysses", [(2, 1, 2), (4, 1, 2), (2, 2, 2)])
def test_ulysses_for_the_linear_layers_only(reference, arch, sp, tp, ulysses):
    """``ulysses_layers="linear"``: lightning and GDN layers of split chunks on the mesh, softmax layers on the
    plain SP ring; the same logits and tokens as one rank."""
    path, logits, tokens = reference[arch]
    with LLM(path, **ENGINE, sp_size=sp, tp_size=tp, ulysses_degree=ulysses, ulysses_layers="linear") as llm:
        assert_logits_close(llm.engine.prompt_logits(LONG), logits)
        assert [o.token_ids for o in llm.generate(BATCH, GREEDY, use_tqdm=False)] == tokens
        stats = llm.engine.stats()
        assert stats.kv_pages_used == 0 and stats.state_slots_used == 0


def test_linear_only_ulysses_checks_only_the_linear_heads(tmp_path):
    """Softmax heads that do not split over U are an error only when the softmax layers use the mesh."""
    path = save_tiny_model("qwen3_5", str(tmp_path), linear_num_value_heads=8, num_attention_heads=6,
                           num_key_value_heads=2)
    with pytest.raises(ValueError, match=r"--ulysses-degree=4"):
        LLM(path, device="cpu", sp_size=4, ulysses_degree=4)
    assert multiprocessing.active_children() == []
    with LLM(path, **ENGINE) as llm:
        want = llm.generate([LONG], GREEDY, use_tqdm=False)[0].token_ids
    with LLM(path, **ENGINE, sp_size=4, ulysses_degree=4, ulysses_layers="linear") as llm:
        assert llm.generate([LONG], GREEDY, use_tqdm=False)[0].token_ids == want
    with pytest.raises(ValueError, match="--ulysses-layers must be one of"):
        LLM(path, device="cpu", sp_size=2, ulysses_degree=2, ulysses_layers="softmax")
