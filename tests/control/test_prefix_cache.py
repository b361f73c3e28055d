"""The prefix cache: greedy outputs identical with the cache on and off, exact ``cached_tokens``, no leaks.

Workloads of shared prefixes (siblings on one document, a multi-turn extension, a prefix that ends mid-page,
many concurrent requests on one prefix, an aborted request that shared a prefix, eviction under a tiny cache) run
through the real engine at sp x tp in {1, 2} x {1, 2}, for a softmax model (Llama) and a hybrid one (MiniMax
lightning + softmax, whose matches stop at state snapshots: prompt ends and prefill-chunk ends). The reference is
the same engine at sp = tp = 1 with the cache off.
"""

from __future__ import annotations

import random

import pytest

from server import LLM, SamplingParams
from server.control.cache_manager import CacheManager
from server.control.prefix_cache import PrefixCache, chain_hashes, shared_blocks, window_served
from server.messages import GenerateRequest
from server.runs import rows_before, truncate_runs, union_intervals
from tests.helpers import prompt, save_tiny_model

pytestmark = pytest.mark.slow

PAGE = 8
CHUNK = 48  # prefill chunks end every 48 tokens: where hybrids snapshot their states
DOC = prompt(150, seed=11)  # not a multiple of the page: its end lies mid-page
QUESTIONS = [prompt(n, seed=20 + n) for n in (5, 9, 13)]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
# A cache of about a thousand tokens and eight state snapshots: the workload needs evictions of both.
ENGINE = dict(device="cpu", page_size=PAGE, chunked_prefill_size=CHUNK, sp_min_tokens=24, max_running_requests=8,
              prefix_cache_snapshots=8)
# Per rank: the state pool (split over TP) and about 800 tokens of KV (split over SP and TP), in MB.
CACHE_MB = {"llama": (0.0, 0.6), "minimax_7to1": (1.1, 0.3)}


def cache_gb(arch: str, sp: int = 1, tp: int = 1) -> float:
    state, kv = CACHE_MB[arch]
    return (state / tp + kv / (sp * tp)) / 1000


def test_index_matches_by_page_chains_and_token_by_token():
    cache = PrefixCache(page_size=4, needs_state=False)
    entry = cache.add(list(range(10)), [[(0, 10, 0)]], [[1, 2, 3]], {})
    assert cache.search(list(range(10)) + [99])[0].tokens == 10  # the whole entry, one token left to compute
    assert cache.search(list(range(10)))[0].tokens == 9  # a prompt equal to the entry still computes its last token
    assert cache.search(list(range(6)) + [77, 78])[0].tokens == 6  # ends mid-page
    assert cache.search([0, 1, 2, 9, 9])[0] is None  # no full page in common
    assert chain_hashes(list(range(8)), 4) != chain_hashes([0, 1, 2, 3, 9, 5, 6, 7], 4)
    hybrid = PrefixCache(page_size=4, needs_state=True)
    hybrid.add(list(range(10)), [[(0, 10, 0)]], [[1, 2, 3]], {4: 70, 8: 71})
    hit = hybrid.search(list(range(10)) + [5])[0]
    assert (hit.tokens, hit.snapshot) == (8, 71)  # cut back to the deepest snapshot it covers
    cache.remove(entry)
    assert cache.search(list(range(10)) + [99])[0] is None and not cache.index
    # an SP rank's shard: rows of positions below m are a prefix of its rows
    runs = [(0, 5, 0), (5, 5, 15), (10, 3, 40)]
    assert rows_before(runs, 17) == 7 and truncate_runs(runs, 17) == [(0, 5, 0), (5, 2, 15)]


def test_hash_matches_are_checked_against_the_tokens():
    """A chain-hash match is used only when the tokens agree: an entry whose hashes claim the prompt's blocks but
    whose tokens differ (a collision, forced here) is skipped, and the next best entry serves the hit."""
    cache = PrefixCache(page_size=4, needs_state=False)
    honest = cache.add(list(range(8)) + [50, 51], [[(0, 10, 0)]], [[1, 2, 3]], {})
    prompt = list(range(12)) + [99]
    forged_tokens = [9] * 12
    forged = cache.add(forged_tokens, [[(0, 12, 0)]], [[4, 5, 6]], {}, hashes=chain_hashes(prompt, 4)[:3])
    hit, shared = cache.search(prompt)
    assert hit.entry is honest and hit.tokens == 8 and shared == 8
    cache.remove(honest)
    assert cache.search(prompt) == (None, 0)
    cache.remove(forged)
    assert not cache.index


def test_chain_hashes_continue_from_known_ones_and_shared_blocks_bisects():
    tokens = prompt(203, seed=3)
    whole = chain_hashes(tokens, 16)
    assert chain_hashes(tokens, 16, chain_hashes(tokens[:150], 16)) == whole
    assert chain_hashes(tokens[:100], 16, whole) == whole[:6]
    other = chain_hashes(tokens[:70] + [1] + tokens[71:], 16)
    assert shared_blocks(whole, other) == 4 and shared_blocks(whole, whole[:7]) == 7
    assert shared_blocks(whole, []) == 0 and shared_blocks(whole, chain_hashes([5] + tokens[1:], 16)) == 0


def test_cache_salts_separate_the_hash_chains():
    """vLLM's cache_salt: an entry added under one salt is found only by prompts hashed with the same salt."""
    cache = PrefixCache(page_size=4, needs_state=False)
    tokens = list(range(10))
    salted = chain_hashes(tokens, 4, salt="a")
    assert salted != chain_hashes(tokens, 4) and salted != chain_hashes(tokens, 4, salt="b")
    assert chain_hashes(tokens, 4, chain_hashes(tokens[:5], 4, salt="a"), salt="a") == salted
    cache.add(tokens, [[(0, 10, 0)]], [[1, 2, 3]], {}, hashes=salted)
    query = tokens + [99]
    assert cache.search(query, chain_hashes(query, 4))[0] is None
    assert cache.search(query, chain_hashes(query, 4, salt="b"))[0] is None
    assert cache.search(query, chain_hashes(query, 4, salt="a"))[0].tokens == 10


def test_bulk_page_holds_count_as_one_reference_each():
    """The written-out loops for a cached prefix's pages (a request takes them; an ended request's pages pass to
    its entry) leave the reference counts and the cached-only count as page-by-page updates do."""
    rng = random.Random(0)
    bulk, single = (CacheManager(num_pages=64, page_size=4, sp_size=1, num_slots=4, split_threshold=8,
                                 split_budget=16) for _ in range(2))
    for cm in (bulk, single):
        rng.seed(1)
        pages = [cm.take_page(0) for _ in range(40)]
        for p in pages:
            for _ in range(rng.randrange(3)):
                cm._ref(0, p, 1, 1)  # held by entries too
    rng.seed(2)
    for _ in range(20):
        pages = rng.sample(range(1, 41), 10)
        if rng.random() < 0.5:
            held = [p for p in pages if single.refs[0].get(p)]
            bulk._hold(0, held)
            for p in held:
                single._ref(0, p, 1, 0)
        else:
            own = [p for p in pages if single.refs[0].get(p, 0) > single.entry_refs[0].get(p, 0)]
            bulk._pass_to_entry(0, own)
            for p in own:
                single._ref(0, p, 0, 1)
        assert (bulk.refs, bulk.entry_refs, bulk.cached_only) == (single.refs, single.entry_refs, single.cached_only)


def run_workload(llm: LLM) -> tuple[list[list[int]], list[int]]:
    """Every workload in turn; the tokens of every request and the cached_tokens of those that report it."""
    outs, cached = [], []

    def gen(prompts):
        res = llm.generate(prompts, GREEDY, use_tqdm=False)
        outs.extend(r.token_ids for r in res)
        cached.extend(r.cached_tokens for r in res)
        return res

    gen([DOC + QUESTIONS[0]])  # warms the document
    gen([DOC + q for q in QUESTIONS])  # siblings, together: all on one cached prefix
    first = gen([DOC + QUESTIONS[1]])[0]
    gen([DOC + QUESTIONS[1] + first.token_ids + QUESTIONS[2]])  # the next turn of a conversation
    # an aborted request that shared the prefix: its pages go back, the next ones are unaffected
    engine = llm.engine
    engine.add_request(GenerateRequest("aborted", DOC + QUESTIONS[2] + [7, 7], SamplingParams(max_tokens=50)))
    for _ in range(3):
        engine.step()
    cached.append(engine.seqs["aborted"].cached_tokens)
    engine.abort_request("aborted")
    engine.step()
    gen([DOC + QUESTIONS[2] + [7, 7, 8]])
    gen([prompt(300, seed=5), prompt(260, seed=6)])  # unrelated long prompts: the cache evicts to make room
    gen([DOC + QUESTIONS[0]])
    return outs, cached


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt"))
    out = {}
    for arch in ("llama", "minimax_7to1"):
        path = save_tiny_model(arch, root)
        with LLM(path, enable_prefix_cache=False, cpu_cache_gb=cache_gb(arch), **ENGINE) as llm:
            out[arch] = (path, run_workload(llm)[0])
    return out


@pytest.mark.parametrize("arch", ["llama", "minimax_7to1"])
@pytest.mark.parametrize("sp,tp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_cache_on_gives_the_same_tokens(reference, arch, sp, tp):
    path, want = reference[arch]
    with LLM(path, sp_size=sp, tp_size=tp, cpu_cache_gb=cache_gb(arch, sp, tp), **ENGINE) as llm:
        got, cached = run_workload(llm)
        assert got == want
        stats = llm.engine.stats()
        assert stats.prefix_cache_hit_tokens == sum(cached) > 0
        assert stats.kv_pages_used == 0 and stats.state_slots_used == 0  # running requests hold nothing
        assert llm.engine.cache.prefix.evictions > 0  # the cache was too small to keep everything
        assert llm.engine.flush_prefix_cache() == stats.prefix_cache_entries
        stats = llm.engine.stats()
        assert stats.kv_pages_cached == 0 and stats.prefix_cache_entries == 0  # no page leaked
    warm = DOC + QUESTIONS[0]
    if arch == "llama":  # softmax only: the longest common prefix with the warm request, one token left to compute
        assert cached[1:4] == [min(lcp(warm, DOC + q), len(DOC + q) - 1) for q in QUESTIONS]
    else:  # hybrid: up to the last state snapshot the prefix covers: a prefill-chunk end (chunks of sp x CHUNK)
        assert cached[1:4] == [len(DOC) // (sp * CHUNK) * (sp * CHUNK)] * 3


def lcp(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("doc_len", [150, 106])
@pytest.mark.parametrize("sp", [1, 2])
def test_hybrid_siblings_find_a_snapshot_at_the_shared_prefix_end(reference, sp, doc_len):
    """A hybrid's match stops at a state snapshot. The second sibling of a document ends a prefill chunk where it
    leaves the cached prefix (the document's end, mid-chunk and mid-page here; at doc_len 106 and sp = 2 that split
    chunk is shorter than the split threshold), so the third one gets the whole document from the cache; tokens
    equal the cache-off run."""
    path, _ = reference["minimax_7to1"]
    doc = prompt(doc_len, seed=11)
    # questions long enough that the second sibling's rest of the prompt is split over SP after its hit
    prompts = [doc + prompt(n, seed=40 + n) for n in (30, 33, 36)]
    assert all(lcp(a, b) == doc_len for a in prompts for b in prompts if a is not b)  # siblings part at the end
    runs = {}
    for cache in (False, True):
        with LLM(path, sp_size=sp, enable_prefix_cache=cache, cpu_cache_gb=cache_gb("minimax_7to1", sp),
                 **ENGINE) as llm:
            outs = [llm.generate([p], GREEDY, use_tqdm=False)[0] for p in prompts]  # one after another
            runs[cache] = [o.token_ids for o in outs], [o.cached_tokens for o in outs]
            if cache:
                assert llm.engine.stats().state_slots_used == 0
    assert runs[True][0] == runs[False][0]
    step = sp * CHUNK  # the first prompt's chunk ends (a split chunk takes sp x CHUNK tokens)
    assert doc_len % step and doc_len % PAGE  # the document ends mid-chunk and mid-page
    assert runs[True][1] == [0, doc_len // step * step, doc_len]


def turns(llm: LLM) -> tuple[list, list]:
    """Short turns over a cached document, the way an agent sends them: the document alone, then turns on it
    (siblings together, the next turn of a conversation), and two requests with prompt logprobs (which compute
    their whole prompt). Greedy tokens and prompt logprobs."""
    scored = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=2)
    llm.generate([DOC], GREEDY, use_tqdm=False)
    outs = llm.generate([DOC + QUESTIONS[0]], scored, use_tqdm=False)
    outs += llm.generate([DOC + q for q in QUESTIONS[1:]], GREEDY, use_tqdm=False)
    outs += llm.generate([DOC + QUESTIONS[1] + outs[1].token_ids + QUESTIONS[2]], scored, use_tqdm=False)
    assert all(o.cached_tokens > 0 for o in outs[1:3])
    logprobs = [[(t.token_id, t.logprob, t.rank, t.top) if t else None for t in o.prompt_logprobs]
                for o in (outs[0], outs[-1])]
    return [o.token_ids for o in outs], logprobs


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("turns"))
    return {arch: save_tiny_model(arch, root) for arch in ("llama", "minimax_7to1")}


@pytest.mark.parametrize("arch", ["llama", "minimax_7to1"])
@pytest.mark.parametrize("sp", [1, 2])
def test_short_turns_in_padded_extend_form_match(tiny_models, arch, sp):
    """Turns over a cached prefix run as padded extend steps (token buckets, padding entries on the scratch page and
    slot; a hybrid's restored state snapshot copied before the step), eagerly here, the form CUDA graphs replay on
    a GPU: the same greedy tokens and prompt logprobs as the plain steps. At sp = 2 the requests are homed (a turn
    over an SP-sharded prefix computes its rows on every SP rank and runs as a plain step)."""
    runs = {}
    engine = {**ENGINE, "chunked_prefill_size": 256, "sp_min_tokens": 1000}  # every prompt in one homed chunk
    for graphs in ("off", "eager"):  # extend buckets 16, 32, ..., 256: every step fits one
        with LLM(tiny_models[arch], sp_size=sp, cpu_cache_gb=cache_gb(arch, sp), cuda_graph=graphs,
                 cuda_graph_max_bs=4, cuda_graph_max_extend_tokens=256, **engine) as llm:
            runs[graphs] = turns(llm)
            if graphs == "eager":
                assert llm.engine.runner.graphs.extend_steps > 0
    assert runs["eager"][0] == runs["off"][0]
    # the same ranks and alternatives; logprobs to fp32 rounding (a GEMM of a padded bucket sums in another order)
    for got, want in zip(runs["eager"][1], runs["off"][1], strict=True):
        assert [w and (w[0], w[2], [t for t, _ in w[3]]) for w in want] == \
            [g and (g[0], g[2], [t for t, _ in g[3]]) for g in got]
        flat = [[lp for w in rows if w for lp in (w[1], *(x for _, x in w[3]))] for rows in (got, want)]
        assert flat[0] == pytest.approx(flat[1], abs=1e-5)


def test_window_served_is_the_deepest_prefix_whose_window_is_held():
    """``window_served`` against a walk over every position: the deepest m' <= m whose window, positions
    ``[m' - w + 1, m')``, lies in the positions an entry's window pages hold."""
    rng = random.Random(0)
    for _ in range(300):
        w = rng.randint(1, 12)
        held = sorted(rng.sample(range(60), rng.randint(0, 40)))
        cover = union_intervals([(p, p + 1) for p in held])
        m = rng.randint(1, 61)
        want = max((t for t in range(1, m + 1) if all(p in held for p in range(max(0, t - w + 1), t))), default=0)
        assert window_served(cover, w, m) == want, (cover, w, m)
