"""Many adapters through little slot memory: adapters take pages of 16 ranks as their rank needs, each
page one contiguous row of the whole model, filled ahead of time off the engine thread; no disk read
on the engine thread, and adapter-aware admission that starves no one."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass

import pytest
import torch

from server.config import Settings
from server.engine.admission import AdmissionOrder
from server.engine.block_manager import BlockManager
from server.engine.llm_engine import IDLE_WAIT_S
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence
from server.engine.types import FinishReason
from server.lora.ref import AdapterRef
from server.lora.setup import build_lora
from server.lora.slot_weights import blocks_for
from server.store import AdapterStore
from tests.api_harness import greedy_ids, peft_model
from tests.engine_utils import build_test_runtime, greedy, random_prompts, run_queued, run_staggered
from tests.lora_fixtures import MIXED_CASES, load_base, make_mixed_adapters, max_rel_err, peft_logits

NAMES = [c.name for c in MIXED_CASES[:6]]  # ranks 4..64, DoRA and lora_bias among them
TOL = 1e-4


@pytest.fixture(scope="module")
def store(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("prefetch_store")
    make_mixed_adapters(tiny_llama_dir, root, MIXED_CASES[:6])
    return root


def _stack(base_dir, store, max_loras=2):
    model = load_base(base_dir)
    settings = Settings(model=base_dir, adapter_store=store, max_loras=max_loras, lora_backend="torch")
    stack = build_lora(model, settings, AdapterStore(store))
    for name in NAMES:
        stack.cache.get(name)  # host copies: prefetching into slots starts from there
    return model, stack


def test_an_adapters_pages_are_rows_holding_what_the_per_module_writes_hold(tiny_llama_dir, store):
    _, stack = _stack(tiny_llama_dir, store, max_loras=2)  # 8 pages
    rows = stack.manager.rows
    for name, pages in (("dora-r8", [6]), ("bias-r4", [3]), ("all-r64", [5, 0, 7, 2])):
        adapter, _ = stack.cache.get(name)
        rows.table.map(1, pages)  # scattered, out of order
        stack.model.set_slot(1, adapter)  # the per-module writes, through the layers' views
        staging = rows.new_staging()
        facts = rows.pack_staged(adapter, 1, pages, staging)
        for k, page in enumerate(pages):
            assert torch.equal(rows.pages[page], staging.pages[k]), (name, k)
        assert torch.equal(rows.vectors[1], staging.vector), name
        other = [p for p in range(8) if p not in pages][: len(pages)]
        rows.copy_in(3, other, staging)  # the CUDA fill's copy, here host to host
        assert all(torch.equal(rows.pages[p], rows.pages[q]) for p, q in zip(pages, other, strict=True))
        assert torch.equal(rows.vectors[3], rows.vectors[1])
        layers = stack.model.layers.items()
        ranks = {n: layer.slot_weights.rank[layer.member][1] for n, layer in layers}
        assert any(ranks.values())
        rows.commit(1, pages, facts)  # the packed rows' facts are those the per-module writes recorded
        assert {n: layer.slot_weights.rank[layer.member][1] for n, layer in layers} == ranks
    start = rows.pages[2].data_ptr()
    end = start + rows.pages.shape[1] * rows.pages.element_size()
    for layer in stack.model.layers.values():
        sw = layer.slot_weights
        for tensor in (sw.a[2], sw.b[2]):
            assert start <= tensor.data_ptr() and tensor[-1:].data_ptr() < end  # inside page 2's row
    assert torch.equal(rows.pages[rows.table.zero_page], torch.zeros_like(rows.pages[0]))
    stack.close()


def test_a_fill_clears_only_what_its_pages_held_and_ends_like_a_fresh_pack(tiny_llama_dir, store):
    """Fills in place (CPU) into pages and slots last written by adapters of other ranks, module sets,
    bias or DoRA: each ends bit-identical to the adapter packed into fresh rows."""
    _, stack = _stack(tiny_llama_dir, store, max_loras=2)  # 8 pages
    rows = stack.manager.rows
    sequence = ["all-r64", "dora-r8", "bias-r4", NAMES[0], "all-r64", NAMES[1], "bias-r4", "all-r64"]
    for i, name in enumerate(sequence):
        adapter = stack.cache.get(name)[0]
        pages = [(3 * i + k) % 8 for k in range(blocks_for(adapter.rank))]
        slot = i % 3
        rows.commit(slot, pages, rows.fill_in_place(adapter, slot, pages))
        fresh = rows.new_staging()
        fresh.pages.fill_(float("nan"))  # nothing may survive from before
        rows.pack_staged(adapter, slot, pages, fresh)
        for k, page in enumerate(pages):
            assert torch.equal(rows.pages[page], fresh.pages[k]), (name, k)
        assert torch.equal(rows.vectors[slot], fresh.vector), name
    stack.close()


@torch.inference_mode()
def test_prefetch_fills_free_pages_off_the_engine_thread(tiny_llama_dir, store):
    model, stack = _stack(tiny_llama_dir, store, max_loras=1)  # 4 pages
    manager, counters = stack.manager, stack.cache.counters
    a, b, c = (AdapterRef(name=n) for n in ("attn-r4", "dora-r8", "all-r64"))  # 1, 1 and 4 pages
    gate, threads = threading.Event(), []
    real_fill = manager.filler._fill

    def held_fill(*args):
        threads.append(threading.current_thread().name)
        gate.wait(30)
        return real_fill(*args)

    manager.filler._fill = held_fill
    manager.prefetch([a, a])
    assert manager.readiness(a) == "loading"  # its page is being written: not schedulable yet
    assert not manager.fits({c.key})  # the page being filled is spoken for
    gate.set()
    deadline = time.monotonic() + 30
    while manager.readiness(a) == "loading" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert manager.readiness(a) == "ready" and manager.resident() == [a.key]
    assert threads == ["lora-slot-fill_0"]
    assert (counters.prefetch_fills, counters.activations) == (1, 1)

    manager.pin(a.key)  # scheduled: the copy is already done
    slots = manager.activate({a.key})
    assert counters.slot_hits == 1 and counters.slot_misses == 0 and counters.activations == 1
    ids = torch.tensor([random_prompts([7], seed=3)[0]])
    manager.prepare_batch([slots[a.key]], [7])
    assert max_rel_err(model(input_ids=ids).logits, peft_logits(tiny_llama_dir, store / a.key, ids)) < TOL

    manager.activate({b.key})  # resident, but nothing runs on it
    manager.prefetch([b, c])  # a is pinned (running) and b is wanted: no room for c's 4 pages
    assert manager.readiness(c) == "ready" and manager.resident() == sorted([a.key, b.key])  # no fill
    manager.prefetch([c])  # b is no longer wanted, but a still runs on its page
    assert manager.resident() == sorted([a.key, b.key])
    manager.unpin(a.key)
    manager.prefetch([c])  # now both give their pages to c
    while manager.readiness(c) == "loading" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert manager.resident() == [c.key] and counters.prefetch_fills == 2 and counters.evictions == 2
    stack.close()


def test_engine_never_reads_adapter_files_on_its_thread(tiny_llama_dir, store):
    rt = build_test_runtime(tiny_llama_dir, adapter_store=store, max_loras=2, max_cpu_loras=2, block_size=4)
    reader, readers = rt.lora.reader, []
    real_read = reader.read

    def recording_read(name):
        readers.append(threading.current_thread().name)
        return real_read(name)

    reader.read = recording_read
    prompts = random_prompts([9, 5, 12, 7, 10, 6, 8, 11, 4, 13, 9, 6], seed=8)
    requests = [(NAMES[i % 6], p) for i, p in enumerate(prompts)]
    # Handles built directly (not through resolve, which would start the loads): the engine must.
    seqs = [Sequence(f"r{i}", p, greedy(5), AdapterRef(name=n)) for i, (n, p) in enumerate(requests)]
    outs = run_staggered(rt.engine.core, seqs, join_every=1)
    assert readers and all(name.startswith("lora-load") for name in readers), Counter(readers)
    for i in (0, 3, 7):
        name, prompt = requests[i]
        assert outs[f"r{i}"] == greedy_ids(peft_model(tiny_llama_dir, {name: store / name}), prompt, 5)
    counters = rt.adapters.stats()
    assert counters.loads >= 6  # every adapter read, never by the engine
    assert counters.prefetch_fills > 0 and counters.slot_hits + counters.slot_misses >= len(seqs)


def test_a_queue_of_more_adapters_than_the_host_cache_reads_each_once(tiny_llama_dir, store):
    """Waiting requests naming more adapters than max_cpu_loras: only the most wanted few are loaded at
    a time, so no load evicts an adapter that is wanted sooner (asking the cache to load every waiting
    request's adapter read 7,698 adapters for 480 requests over 1,000 of them, measured)."""
    rt = build_test_runtime(tiny_llama_dir, adapter_store=store, max_loras=2, max_cpu_loras=2, block_size=4)
    prompts = random_prompts([9, 5, 12, 7, 10, 6] * 2, seed=9)
    seqs = [Sequence(f"r{i}", p, greedy(4), AdapterRef(name=NAMES[i % 6])) for i, p in enumerate(prompts)]
    outs = run_queued(rt.engine.core, seqs).outputs
    assert rt.adapters.stats().loads == 6
    name, prompt = NAMES[4], prompts[4]
    assert outs["r4"] == greedy_ids(peft_model(tiny_llama_dir, {name: store / name}), prompt, 4)


# --- admission order: adapter-aware, age-bounded ------------------------------------------------
@dataclass(frozen=True)
class Handle:
    key: str


class OneSlot:
    """An ``AdapterSlots`` with one slot and every adapter ready: only the slot budget matters."""

    max_loras = 1

    def __init__(self) -> None:
        self.pins: Counter = Counter()
        self.held: str | None = None

    def readiness(self, adapter):
        return "ready"

    def load_error(self, adapter):
        return None

    def prefetch(self, adapters):
        pass

    def idle_wait(self, timeout):
        pass

    def cache_identity(self, adapter):
        return (adapter.key, 0)

    def stale_cache_identities(self):
        return []

    def fits(self, keys):
        return len(set(keys) | {k for k, n in self.pins.items() if n}) <= self.max_loras

    def pin(self, key):
        self.pins[key] += 1
        self.held = key

    def unpin(self, key):
        self.pins[key] -= 1

    def activate(self, keys):
        return {k: 0 for k in keys}

    def prepare_batch(self, seq_slots, seq_num_tokens):
        pass

    def resident(self):
        return [self.held] if self.held else []


def _drive(max_wait_s: float, steps: int, max_loras: int = 1, every: dict[str, int] | None = None):
    """Requests of resident adapters keep arriving (adapter -> one every N steps; default A, every
    step) behind an earlier request for X. Each step is 0.25 s on the scheduler's clock; returns the
    step X started and (request, step) for every later arrival admitted before it."""
    now = [0.0]
    slots = OneSlot()
    slots.max_loras = max_loras
    scheduler = Scheduler(BlockManager(256, 4), 16, 256, slots, AdmissionOrder(max_wait_s), lambda: now[0])
    every = every or {"A": 1}
    x = Sequence("x", [6] * 6, greedy(4), Handle("X"))
    started, overtook = None, []
    for step in range(steps):
        if step == 1:
            scheduler.add(x)
        for key, period in every.items():
            if step % period == 0:
                scheduler.add(Sequence(f"{key}{step}", [5] * 6, greedy(4), Handle(key)))
        out = scheduler.schedule()
        for seq in out.scheduled:
            if seq is x and started is None:
                started = step
            elif started is None and step >= 1 and seq.num_computed_tokens == 0 and seq.arrival_time > 0:
                overtook.append((seq.request_id, step))
        scheduler.postprocess(out, {id(s): 7 for s in out.scheduled if s.will_sample})
        for seq in list(scheduler.running):
            if seq.num_output_tokens >= seq.params.max_tokens:
                scheduler.finish(seq, FinishReason.LENGTH)
        now[0] += 0.25
    return started, overtook


def test_a_step_with_only_loading_requests_waits_for_the_load_instead_of_spinning(tiny_llama_dir, store):
    """A busy loop of empty steps would hold the GIL the loader and slot-fill threads need (measured:
    8 rank-16 slot fills took 4 s under a spinning engine instead of milliseconds)."""
    rt = build_test_runtime(tiny_llama_dir, adapter_store=store, max_loras=2, block_size=4)
    core, manager = rt.engine.core, rt.lora.manager
    real_fill = manager.filler._fill

    def slow_fill(*args):
        time.sleep(0.3)
        return real_fill(*args)

    manager.filler._fill = slow_fill
    rt.lora.cache.get(NAMES[0])  # in host memory: the slot copy is what the request waits on
    core.add(Sequence("r0", random_prompts([6], seed=4)[0], greedy(2), AdapterRef(name=NAMES[0])))
    empty_steps = 0
    while not core.step():
        empty_steps += 1
    assert 0 < empty_steps <= 0.3 / IDLE_WAIT_S + 5  # each empty step blocked on the copy
    rt.close()


def test_resident_adapters_go_first_until_the_waiting_one_is_old_enough():
    started, overtook = _drive(max_wait_s=1.0, steps=20)
    assert overtook  # A's later requests went ahead while X could not get the slot
    # X is 1 s old after 4 steps: then A (the only adapter running) is drained, its running requests
    # finish (4 tokens each) and X gets the slot: started within max_wait + one request's length.
    assert started is not None and 4 <= started <= 1 + 4 + 4 + 1
    assert _drive(max_wait_s=100.0, steps=20)[0] is None  # the age bound is what lets X in


def test_a_starving_request_drains_one_adapter_while_the_others_keep_joining():
    started, overtook = _drive(max_wait_s=1.0, steps=30, max_loras=2, every={"A": 1, "B": 3})
    assert started is not None and started <= 1 + 4 + 4 + 1
    starving_from = 1 + 4  # X arrived at step 1 and is 1 s (4 steps) old from step 5
    assert any(rid.startswith("A") and step >= starving_from for rid, step in overtook)  # A still joins
    assert not any(rid.startswith("B") and step > starving_from for rid, step in overtook)  # B drains


def test_arrival_order_when_slots_are_not_short():
    started, overtook = _drive(max_wait_s=1.0, steps=6, max_loras=2)
    assert started == 1 and overtook == []


def test_longest_cached_prefix_goes_first_within_the_age_bound():
    order = AdmissionOrder(max_wait_s=1.0)
    seqs = [Sequence(name, [5] * 8, greedy(2)) for name in ("none", "most", "some")]
    for seq in seqs:
        seq.arrival_time = 0.5
    hits = {"none": 0, "most": 3, "some": 1}

    def cached(seq):
        return hits[seq.request_id]

    assert [s.request_id for s in order.order(seqs, None, set(), 1.0, cached)] == ["most", "some", "none"]
    seqs[0].arrival_time = 0.0  # "none" has waited 1 s: it goes first, whatever the cache holds
    assert [s.request_id for s in order.order(seqs, None, set(), 1.0, cached)] == ["none", "most", "some"]
    assert order.order(seqs, None, set(), 1.0, None) == seqs  # no prefix cache: arrival order
    many = [Sequence(f"r{i}", [5] * 8, greedy(2)) for i in range(129)]
    assert order.order(many, None, set(), 0.0, lambda s: int(s.request_id[1:])) == many  # too many to look up


def test_free_slots_go_to_starving_requests_then_to_the_most_wanted_adapters():
    order = AdmissionOrder(max_wait_s=1.0)
    keys = ["rare", "hot", "warm", "hot", "old", "warm", "hot"]  # arrival order
    seqs = [Sequence(f"r{i}", [5] * 8, greedy(2), Handle(k)) for i, k in enumerate(keys)]
    for seq in seqs:
        seq.arrival_time = 0.5
    assert [a.key for a in order.prefetch_order(seqs, 1.0)] == ["hot", "warm", "rare", "old"]
    seqs[4].arrival_time = 0.0  # "old" has waited 1 s: its slot comes first
    assert [a.key for a in order.prefetch_order(seqs, 1.0)] == ["old", "hot", "warm", "rare"]
    base = Sequence("base", [5] * 8, greedy(2))
    base.arrival_time = 0.0
    assert [a.key for a in order.prefetch_order([base, *seqs[:1]], 1.0)] == ["rare"]  # base rows need no slot


def test_activation_takes_a_waiting_requests_pages_only_when_it_must(tiny_llama_dir, store):
    _, stack = _stack(tiny_llama_dir, store, max_loras=1)  # 4 pages
    manager = stack.manager
    w, a, b, d, e = (
        AdapterRef(name=n) for n in ("attn-r4", "all-r8-rslora", "patterns-r16", "dora-r8", "bias-r4")
    )
    manager.prefetch([w])  # a waiting request's adapter fills one page
    deadline = time.monotonic() + 30
    while manager.readiness(w) == "loading" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert manager.resident() == [w.key]
    for ref in (a, b, d):  # the free pages, one each
        assert set(manager.activate({ref.key})) == {ref.key}
    assert manager.resident() == sorted([w.key, a.key, b.key, d.key])
    manager.activate({e.key})  # full: w is the least recently used, but wanted; a is taken instead
    assert manager.resident() == sorted([w.key, b.key, d.key, e.key])
    manager.activate({"all-r64"})  # 4 pages: has to take w's too
    assert manager.resident() == ["all-r64"]
    stack.close()


@pytest.mark.parametrize("composed", [False, True])
def test_a_request_on_a_slot_with_older_weights_is_loaded_again(tiny_llama_dir, store, composed):
    """A reload in place leaves the old weights in the slot; when the host copy of the new ones is gone
    too (evicted; a composition's is dropped by the reload), the waiting request's load must start
    from prefetch, not hang on a slot that looks resident."""
    rt = build_test_runtime(tiny_llama_dir, adapter_store=store, max_loras=2, max_cpu_loras=1 if not composed else 8,
                            block_size=4)  # fmt: skip
    core, cache, manager = rt.engine.core, rt.lora.cache, rt.lora.manager
    ref = AdapterRef(weights={NAMES[0]: 0.5, NAMES[1]: 0.5}) if composed else AdapterRef(name=NAMES[0])
    prompts = random_prompts([7, 8], seed=1)
    assert run_queued(core, [Sequence("r0", prompts[0], greedy(3), ref)], max_steps=200).finished == {"r0"}
    cache.replace(NAMES[0], cache.get(NAMES[0])[0])  # what an in-place reload does
    manager.revive(NAMES[0])
    if not composed:
        cache.get(NAMES[2])  # another adapter's load evicts the new host copy (max_cpu_loras=1)
    assert ref.key in manager.resident() and cache.state(ref.key) == "missing"
    assert run_queued(core, [Sequence("r1", prompts[1], greedy(3), ref)], max_steps=200).finished == {"r1"}
