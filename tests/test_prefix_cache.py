"""Prefix caching: the hash chain, the block pool (refcounts, LRU of cached-free blocks), and the
engine with caching on against caching off and against PEFT, across adapters, reloads, preemption,
aborts and KV exhaustion."""

from __future__ import annotations

import shutil

import pytest

from server.engine.block_manager import BlockManager
from server.engine.prefix_cache import extend_block_hashes
from server.engine.sequence import Sequence
from server.engine.types import FinishReason
from tests.api_harness import greedy_ids, peft_model
from tests.engine_utils import build_test_runtime, greedy, random_prompts, run_queued, run_staggered
from tests.lora_fixtures import MIXED_CASES, make_mixed_adapters

BS = 4
NEW = 6
PREFIX = random_prompts([26], seed=21)[0]  # 6 full blocks and a half
NAMES = [c.name for c in MIXED_CASES[:3]]


@pytest.fixture(scope="module")
def store(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix_store")
    make_mixed_adapters(tiny_llama_dir, root, MIXED_CASES[:3])
    return root


def _hashes(identity, tokens, n=None):
    out: list[bytes] = []
    extend_block_hashes(out, identity, tokens, BS, n if n is not None else len(tokens) // BS)
    return out


def test_hash_chain_names_the_whole_prefix_under_one_identity():
    tokens = list(range(3, 15))
    base = _hashes(None, tokens)
    assert base == _hashes(None, tokens) and len(set(base)) == 3
    for other in (("a", 0), ("a", 1), ("b", 0), ("compose(a:0.5,b:0.5)", (0, 0))):
        assert not set(_hashes(other, tokens)) & set(base)  # no block shared with another identity
    assert _hashes(("a", 0), tokens) != _hashes(("a", 1), tokens)  # nor across a reload
    changed = [99] + tokens[1:]  # the first block differs: every later block's name differs too
    assert not set(_hashes(None, changed)) & set(base)
    longer = _hashes(None, tokens + [7, 7, 7, 7])
    assert longer[:3] == base


def _seq(name, tokens):
    return Sequence(name, tokens, greedy(4))


def _run_prefill(bm: BlockManager, seq: Sequence, identity=None) -> list[int]:
    """Admits ``seq`` on its cached prefix and computes its whole prompt; returns the prefix blocks."""
    prefix = bm.cached_prefix(seq, identity)
    assert bm.can_admit(seq, prefix, len(seq))
    bm.admit(seq, prefix, len(seq))
    seq.num_computed_tokens = len(seq)
    bm.publish(seq)
    return prefix


def test_pool_reuses_shares_and_evicts_least_recently_used_free_blocks_first():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_caching=True)
    a = _seq("a", list(range(10, 22)))  # 3 full blocks
    assert _run_prefill(bm, a) == []
    a_blocks = list(a.block_table)
    bm.free(a)
    assert bm.num_cached_free_blocks == 3 and bm.usage == 0.0 and bm.num_free_blocks == 8

    b = _seq("b", list(range(10, 22)) + [5, 6])  # a's 3 blocks, then a partial one of its own
    prefix = _run_prefill(bm, b)
    assert prefix == a_blocks and b.num_cached_tokens == 12 and b.num_computed_tokens == 14
    assert bm.num_cached_free_blocks == 0 and bm.usage == 4 / 8
    c = _seq("c", list(range(10, 22)) + [9])  # shares them with b while b runs: refcount 2
    assert _run_prefill(bm, c) == prefix and bm.ref_counts[prefix[0]] == 2
    bm.free(b)
    assert bm.ref_counts[prefix[0]] == 1 and not bm.cache.is_evictable(prefix[0])

    d = _seq("d", list(range(40, 56)))  # 4 full blocks, freed before c: older in the LRU
    _run_prefill(bm, d)
    d_blocks = list(d.block_table)
    bm.free(d)
    bm.free(c)  # its partial block is not cached; its prefix goes in tail first
    assert list(bm.cache._evictable) == d_blocks[::-1] + prefix[::-1]

    e = _seq("e", list(range(100, 120)))  # 5 blocks: the never-cached free one, then d's (oldest)
    bm.admit(e, [], len(e))
    assert bm.num_free_blocks == 3
    assert bm.cache.lookup(_hashes(None, list(range(10, 22)))) == prefix
    assert bm.cache.lookup(_hashes(None, list(range(40, 56)))) == []


def test_blocks_in_use_are_never_evicted_and_exhaustion_is_refused():
    bm = BlockManager(num_blocks=4, block_size=BS, enable_caching=True)
    a = _seq("a", list(range(10, 22)))
    _run_prefill(bm, a)  # 3 blocks in use, cached
    other = _seq("o", list(range(50, 59)))  # needs 3 blocks, only 1 free: the cached ones are in use
    assert not bm.can_admit(other, [], len(other))
    bm.free(a)
    assert bm.can_admit(other, [], len(other))
    bm.admit(other, [], len(other))
    assert sorted(bm.ref_counts) == [0, 1, 1, 1]


def test_full_prompt_hit_recomputes_its_last_block():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_caching=True)
    a = _seq("a", list(range(10, 22)))
    _run_prefill(bm, a)
    bm.free(a)
    again = _seq("again", list(range(10, 22)))
    assert len(bm.cached_prefix(again, None)) == 2  # 12 tokens cached, but the last one must run


def test_drop_forgets_an_identity_and_never_publishes_it_again():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_caching=True)
    tokens = list(range(10, 22))
    a, b = _seq("a", tokens), _seq("b", tokens + [1])
    _run_prefill(bm, a, ("x", 0))
    _run_prefill(bm, b, ("y", 0))
    bm.free(a)
    bm.drop(("x", 0))
    assert bm.num_cached_free_blocks == 0 and len(bm.free_blocks) == 8 - len(b.block_table)
    late = _seq("late", tokens)  # a request still running on the old weights publishes nothing
    _run_prefill(bm, late, ("x", 0))
    assert bm.cached_prefix(_seq("n", tokens + [2]), ("x", 0)) == []
    assert len(bm.cached_prefix(_seq("m", tokens + [2]), ("y", 0))) == 3


def test_dropped_identities_are_remembered_boundedly():
    """Each delete of an adapter name drops one identity: a server that sees many names keeps only the
    most recent ones (a block published under an older one is never matched, its chain names it)."""
    from server.engine.prefix_cache import MAX_DROPPED_IDENTITIES, PrefixCache

    cache = PrefixCache()
    for i in range(MAX_DROPPED_IDENTITIES + 50):
        cache.drop((f"churn-{i}", 1))
    assert len(cache._dropped) == MAX_DROPPED_IDENTITIES
    cache.publish(0, b"h-old", ("churn-0", 1))  # long forgotten: publishing it only caches a dead name
    cache.publish(1, b"h-new", (f"churn-{MAX_DROPPED_IDENTITIES + 49}", 1))  # recent: refused
    assert cache.num_cached == 1 and cache.lookup([b"h-new"]) == []


# --- the engine, caching on vs off --------------------------------------------------------------
def _requests(names: list[str | None], suffix_lens: list[int]) -> list[tuple[str | None, list[int]]]:
    suffixes = random_prompts(suffix_lens, seed=22)
    return [(names[i % len(names)], PREFIX + s) for i, s in enumerate(suffixes)]


def _seqs(rt, requests) -> list[Sequence]:
    return [
        Sequence(f"r{i}", prompt, greedy(NEW), rt.adapters.resolve(name) if name else None)
        for i, (name, prompt) in enumerate(requests)
    ]


def _serve(rt, requests, join_every=1) -> tuple[dict[str, list[int]], list[Sequence]]:
    seqs = _seqs(rt, requests)
    return run_staggered(rt.engine.core, seqs, join_every), seqs


def _burst(rt, requests) -> tuple[dict[str, list[int]], dict[str, int], list[Sequence]]:
    """Every request queued before the first step; token ids per request, and the step each one
    got its first token in."""
    seqs = _seqs(rt, requests)
    run = run_queued(rt.engine.core, seqs)
    return run.outputs, run.first_step, seqs


def _runtime(model_dir, store, caching: bool, **kw):
    """The engine with every adapter of ``store`` already in a device slot, so arrival order is what
    decides which request computes a prefix first (not which adapter happened to load first)."""
    settings = dict(adapter_store=store, max_loras=4, block_size=BS, max_num_batched_tokens=64)
    rt = build_test_runtime(model_dir, prefix_caching=caching, **{**settings, **kw})
    rt.lora.manager.activate(set(rt.adapters.names()))
    return rt


def _all_free(rt) -> bool:
    bm = rt.engine.core.block_manager
    return bm.num_free_blocks == bm.num_blocks and not any(bm.ref_counts)


def test_outputs_identical_with_caching_on_and_off_and_match_peft(tiny_llama_dir, store):
    names = NAMES
    order = [names[0], None, names[1], names[0], None, names[2], names[1], None]
    requests = _requests(order, [3, 5, 2, 6, 1, 4, 3, 7])
    on_rt, off_rt = _runtime(tiny_llama_dir, store, True), _runtime(tiny_llama_dir, store, False)
    on, on_seqs = _serve(on_rt, requests)
    off, off_seqs = _serve(off_rt, requests)
    assert on == off
    cached = {s.request_id: s.num_cached_tokens for s in on_seqs}
    first_of = {}
    for seq, (name, _) in zip(on_seqs, requests, strict=True):
        first_of.setdefault(name, seq.request_id)
        want = 0 if first_of[name] == seq.request_id else 24  # 6 blocks of the shared prefix, per identity
        assert cached[seq.request_id] == want, (name, seq.request_id)
    assert all(s.num_cached_tokens == 0 for s in off_seqs)
    stats = on_rt.engine.core.stats()
    assert stats.prefix_cache_hits == 24 * (len(requests) - 4)
    assert stats.prefix_cache_queries == sum(len(p) for _, p in requests)
    assert stats.kv_cache_usage == 0.0 and stats.kv_cache_cached_free > 0
    assert off_rt.engine.core.stats().prefix_cache_queries == 0
    for i in (3, 4, 6):  # second requests of an adapter, of the base, of another adapter: PEFT agrees
        name, prompt = requests[i]
        model = peft_model(tiny_llama_dir, {name: store / name} if name else None)
        assert on[f"r{i}"] == greedy_ids(model, prompt, NEW), name
    assert _all_free(on_rt) and _all_free(off_rt)


def test_a_burst_on_a_new_prefix_computes_it_once(tiny_llama_dir, store):
    """Queued together, with a chunk budget (16 tokens) smaller than the shared prefix (26): the first
    request computes the prefix over several steps and the others wait for its blocks instead of
    computing the same prefix beside it, then start on them; outputs as with caching off."""
    requests = _requests([NAMES[0]] * 4 + [None] * 2, [3, 5, 2, 6, 1, 4])
    outs = {}
    for caching in (True, False):
        rt = _runtime(tiny_llama_dir, store, caching, max_num_batched_tokens=16, max_num_seqs=8)
        outs[caching], _, seqs = _burst(rt, requests)
        computed = rt.engine.core.stats().num_batched_tokens_total
        if caching:
            assert [s.num_cached_tokens for s in seqs] == [0, 24, 24, 24, 0, 24]
            assert computed == sum(len(p) for _, p in requests) - 24 * 4 + len(requests) * (NEW - 1)
        assert _all_free(rt)
    assert outs[True] == outs[False]


def test_a_step_that_completes_a_shared_prefix_takes_no_new_prefill(tiny_llama_dir, store):
    """Finish-prefix-first: the step in which the first request on a new prefix completes it takes no
    other new prompt (B1 would fit the 64-token budget beside A1), so A's followers start a step
    sooner; then A's followers and B1 share a step, then B's followers. Outputs as with caching off."""
    other = random_prompts([26], seed=23)[0]
    turns = random_prompts([3, 2, 5, 4, 1, 6], seed=24)
    requests = [(None, (PREFIX if i in (0, 2, 3) else other) + t) for i, t in enumerate(turns)]
    outs, firsts = {}, {}
    for caching in (True, False):
        rt = _runtime(tiny_llama_dir, store, caching, max_num_batched_tokens=64, max_num_seqs=8)
        outs[caching], firsts[caching], _ = _burst(rt, requests)
        assert _all_free(rt)
    assert outs[True] == outs[False]
    assert firsts[True] == {"r0": 0, "r2": 1, "r3": 1, "r1": 1, "r4": 2, "r5": 2}
    assert firsts[False]["r1"] == 0  # without caching both first prompts share the first step


def test_no_reuse_across_adapters_or_across_a_reload(tiny_llama_dir, store, tmp_path):
    names = NAMES
    live = tmp_path / "live"
    live.mkdir()
    shutil.copytree(store / names[0], live / "swap")
    shutil.copytree(store / names[1], live / names[1])
    rt = _runtime(tiny_llama_dir, live, True)
    prompt = PREFIX + [5, 6]
    _, seqs = _serve(rt, [("swap", prompt), (names[1], prompt), (None, prompt), ("swap", prompt)])
    assert [s.num_cached_tokens for s in seqs] == [0, 0, 0, 24]
    blocks = rt.engine.core.block_manager
    assert ("swap", 0) in blocks.cache.identities()

    shutil.rmtree(live / "swap")
    shutil.copytree(store / names[2], live / "swap")
    rt.lora.cache.replace("swap", rt.lora.reader.read("swap"))  # reload in place: new weights
    out, [after] = _serve(rt, [("swap", prompt)])
    assert after.num_cached_tokens == 0
    assert out["r0"] == greedy_ids(peft_model(tiny_llama_dir, {"swap": store / names[2]}), prompt, NEW)
    assert blocks.cache.identities() == {("swap", 1), (names[1], 0), None}  # the old weights' are gone

    rt.lora.manager.retire(names[1])  # unload: its cached blocks go too
    rt.engine.core.scheduler.schedule()  # (nothing waiting: just the bookkeeping of a step)
    assert blocks.cache.identities() == {("swap", 1), None}
    assert blocks.num_cached_free_blocks == 16 and _all_free(rt)


def test_preemption_and_abort_with_shared_blocks_keep_outputs(tiny_llama_dir, store):
    names = NAMES
    requests = _requests([None, names[0], None, names[0], None, names[0]], [5, 9, 3, 7, 11, 2])
    want, _ = _serve(_runtime(tiny_llama_dir, store, False), requests)
    # 22 blocks of 4 for six requests of ~36 tokens each: preemption must happen, on shared blocks.
    rt = _runtime(tiny_llama_dir, store, True, num_kv_blocks=22)
    got, seqs = _serve(rt, requests, join_every=1)
    assert rt.engine.core.scheduler.num_preemptions > 0
    assert got == want
    assert sum(s.num_cached_tokens for s in seqs) > 0
    assert _all_free(rt)

    core = rt.engine.core  # abort one of two requests sharing a prefix mid-way: the other is unharmed
    pair = [Sequence(f"p{i}", requests[i][1], greedy(NEW)) for i in (0, 2)]
    for seq in pair:
        core.add(seq)
    core.step()
    core.step()
    core.abort("p0")
    while core.has_work():
        core.step()
    assert pair[0].finish_reason == FinishReason.ABORT
    assert pair[1].token_ids[len(requests[2][1]) :] == want["r2"]
    assert _all_free(rt)


def test_kv_exhaustion_evicts_cached_prefixes_and_keeps_serving(tiny_llama_dir, store):
    prompts = random_prompts([30, 27, 33, 29, 31, 26, 28, 32], seed=23)  # distinct: nothing shared
    rt = _runtime(tiny_llama_dir, store, True, num_kv_blocks=12)
    want, _ = _serve(_runtime(tiny_llama_dir, store, False, num_kv_blocks=12), [(None, p) for p in prompts])
    got, _ = _serve(rt, [(None, p) for p in prompts], join_every=3)
    assert got == want
    bm = rt.engine.core.block_manager
    assert bm.num_cached_free_blocks > 0 and _all_free(rt)
    again, [seq] = _serve(rt, [(None, prompts[-1])])  # the most recent prompt is still cached
    assert seq.num_cached_tokens == 28 and again["r0"] == want["r7"]


def test_a_request_for_prompt_logprobs_computes_its_prompt(tiny_llama_dir, store):
    """Cached K/V carries no logits: a request that asks for its prompt's logprobs takes no cached
    prefix (its own blocks are still published), and gets the same logprobs as one that found none."""
    rt = _runtime(tiny_llama_dir, store, True)
    prompt = PREFIX + [5, 6]
    seqs = [
        Sequence(f"r{i}", prompt, greedy(NEW, prompt_logprobs=True), rt.adapters.resolve(NAMES[0]))
        for i in range(2)
    ]
    seqs.append(Sequence("r2", prompt, greedy(NEW), rt.adapters.resolve(NAMES[0])))
    out = run_staggered(rt.engine.core, seqs, 1)
    assert [s.num_cached_tokens for s in seqs] == [0, 0, 24]
    assert len(seqs[0].prompt_logprobs) == len(prompt) - 1
    assert seqs[1].prompt_logprobs == pytest.approx(seqs[0].prompt_logprobs, abs=1e-5)
    assert out["r0"] == out["r1"] == out["r2"]
    assert _all_free(rt)
