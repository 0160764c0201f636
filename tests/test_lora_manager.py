"""Adapter residency: host LRU, device slots with pins and LRU eviction, background loads, reload/unload.

Outputs are checked against PEFT while the slot memory of one rank-64 adapter (4 pages of 16 ranks)
serves 6 adapters of ranks 4 to 64, so every eviction and re-activation has to copy exactly the right
weights back into whichever pages it gets.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import threading
import time

import pytest
import torch

from server.config import Settings
from server.engine.types import EngineStats
from server.lora.backend import TorchLoRABackend
from server.lora.compose import compose_adapters
from server.lora.layers import inject_lora
from server.lora.ref import AdapterRef
from server.lora.setup import build_lora
from server.lora.slot_weights import blocks_for
from server.lora.spec import BaseModelSpec
from server.service.adapter_service import AdapterService
from server.store import AdapterStore
from tests.lora_fixtures import (
    MIXED_CASES,
    load_base,
    make_mixed_adapters,
    make_peft_adapter,
    max_rel_err,
    peft_logits,
)

TOL = 1e-4
LENGTH = 6


@pytest.fixture(scope="module")
def store(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    make_mixed_adapters(tiny_llama_dir, root, MIXED_CASES[:6])
    return root


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 500, (1, LENGTH), generator=g) for _ in range(4)]


@pytest.fixture(scope="module")
def expected(tiny_llama_dir, store, prompts):
    """PEFT logits for every (adapter or base, prompt)."""
    names = [None, *(c.name for c in MIXED_CASES[:6])]
    return {
        (name, i): peft_logits(tiny_llama_dir, store / name if name else None, ids)
        for name in names
        for i, ids in enumerate(prompts)
    }


def _stack(base_dir, store, max_loras=2, max_cpu_loras=8, max_rank=64, **settings):
    """The base model with the LoRA stack the server builds for these settings."""
    model = load_base(base_dir)
    config = Settings(model=base_dir, adapter_store=store, max_loras=max_loras, max_cpu_loras=max_cpu_loras,
                      max_lora_rank=max_rank, lora_backend="torch", **settings)  # fmt: skip
    return model, build_lora(model, config, AdapterStore(store))


def _service(stack, store, **settings) -> AdapterService:
    config = Settings(adapter_store=store, **settings)
    return AdapterService(config, AdapterStore(store), stack, "base", lambda: EngineStats())


def _wait(cache, ref, timeout=30.0):
    deadline = time.monotonic() + timeout
    while cache.state(ref.key) == "loading" and time.monotonic() < deadline:
        time.sleep(0.01)
    return cache.state(ref.key)


def _ready(manager, key, timeout=30.0) -> bool:
    """Waits as the scheduler would (each step prefetch() loads again what the host LRU dropped, and
    readiness() reports); False on error."""
    ref = AdapterRef(name=key)
    deadline = time.monotonic() + timeout
    while (status := manager.readiness(ref)) == "loading" and time.monotonic() < deadline:
        manager.prefetch([ref])
        time.sleep(0.01)
    return status == "ready"


@torch.inference_mode()
def _step(model, manager, rows):
    """One engine step over ``rows`` = [(adapter key or None, prompt ids)]; returns per-row logits."""
    keys = {k for k, _ in rows if k}
    slots = manager.activate(keys) if keys else {}
    manager.prepare_batch([slots[k] if k else -1 for k, _ in rows], [LENGTH] * len(rows))
    logits = model(input_ids=torch.cat([ids for _, ids in rows])).logits
    return [logits[i : i + 1] for i in range(len(rows))]


def _pages_in_use(manager) -> int:
    pages = {c.name: blocks_for(c.kwargs["r"]) for c in MIXED_CASES}
    return sum(pages[name] for name in manager.resident())


@pytest.mark.parametrize("max_cpu_loras", [8, 2])
def test_one_slots_memory_six_adapters_in_flight_keep_outputs_identical(
    tiny_llama_dir, store, prompts, expected, max_cpu_loras
):
    """A mini scheduler: FIFO admission while the adapters fit in the slot memory, pin while running."""
    model, stack = _stack(tiny_llama_dir, store, max_loras=1, max_cpu_loras=max_cpu_loras)
    manager = stack.manager
    names = [c.name for c in MIXED_CASES[:6]]
    rng = random.Random(0)
    waiting = [(names[i % 6] if i % 5 else None, i % len(prompts), rng.randint(1, 3)) for i in range(18)]
    for key, _, _ in waiting:
        if key:
            stack.cache.prefetch(AdapterRef(name=key))
    running: list[list] = []
    checked, most_resident = 0, 0
    while waiting or running:
        active = {r[0] for r in running if r[0]}
        while waiting:
            key = waiting[0][0]
            if key and (not _ready(manager, key) or not manager.fits(active | {key})):
                break
            running.append(list(waiting.pop(0)))
            if key:
                manager.pin(key)
                active.add(key)
        outputs = _step(model, manager, [(key, prompts[p]) for key, p, _ in running])
        assert _pages_in_use(manager) <= 4
        most_resident = max(most_resident, len(manager.resident()))
        for request, logits in zip(running, outputs, strict=True):
            assert max_rel_err(logits, expected[(request[0], request[1])]) < TOL, request
            checked += 1
            request[2] -= 1
        for request in [r for r in running if r[2] == 0]:
            running.remove(request)
            if request[0]:
                manager.unpin(request[0])
    counters = stack.cache.counters.snapshot()
    assert checked >= 18 and counters.evictions >= 4 and counters.activations >= 6
    assert most_resident >= 3  # low-rank adapters share the memory of one rank-64 slot
    assert counters.load_seconds > 0 and counters.load_failures == 0
    if max_cpu_loras >= 6:
        assert counters.loads == 6  # each adapter parsed once; slots refill from host memory
    else:
        assert counters.loads > 6 and counters.cpu_evictions > 0
    stack.close()


def test_pins_block_eviction_and_lru_picks_the_victims(tiny_llama_dir, store):
    """Slot memory of 4 pages (one rank-64 adapter): four rank <= 16 adapters, or the rank-64 one."""
    _, stack = _stack(tiny_llama_dir, store, max_loras=1)
    manager = stack.manager
    a, b, c, big, d = (x.name for x in MIXED_CASES[:5])  # 1, 1, 1, 4 and 1 pages
    slot_a = manager.activate({a})[a]
    manager.activate({b})
    manager.activate({c})
    assert manager.activate({a}) == {a: slot_a}  # resident: no copy, a becomes most recent
    manager.activate({d})
    assert manager.resident() == sorted([a, b, c, d])  # four adapters in one rank-64 slot's memory
    activations = manager.counters.activations
    manager.activate({"bias-r4"})  # evicts b, the least recently used
    assert (
        manager.resident() == sorted([a, c, d, "bias-r4"]) and manager.counters.activations == activations + 1
    )
    manager.pin(a)
    assert not manager.fits({big}) and manager.fits({a, c})
    with pytest.raises(RuntimeError, match="do not fit in the slot memory"):
        manager.activate({big})
    assert manager.resident() == sorted([a, c, d, "bias-r4"])  # nothing evicted for it
    manager.unpin(a)
    assert manager.fits({big})
    manager.activate({big})  # evicts all four
    assert manager.resident() == [big]
    manager.pin(big)
    assert not manager.fits({a})
    manager.unpin(big)
    assert manager.activate({a, b}).keys() == {a, b} and manager.resident() == sorted([a, b])
    with pytest.raises(RuntimeError, match="without a matching pin"):
        manager.unpin(c)
    stack.close()


def test_background_load_states_and_errors(tiny_llama_dir, store, tmp_path):
    _, stack = _stack(tiny_llama_dir, store)
    cache, manager = stack.cache, stack.manager
    good = AdapterRef(name=MIXED_CASES[0].name)
    assert cache.state(good.key) == "missing"
    cache.prefetch(good)
    assert _wait(cache, good) == "ready" and cache.error(good.key) is None

    missing = AdapterRef(name="nope")
    assert not stack.catalog.exists("nope")
    cache.prefetch(missing)
    assert _wait(cache, missing) == "error" and cache.error(missing.key) == "adapter 'nope' not found"

    broken = tmp_path / "broken"
    shutil.copytree(store / good.name, broken)
    data = (broken / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[:100])
    stack.catalog.register("broken", broken)
    assert stack.catalog.exists("broken") and "broken" in stack.catalog.names()
    ref = AdapterRef(name="broken")
    cache.prefetch(ref)
    assert _wait(cache, ref) == "error"
    assert "adapter_model.safetensors is corrupt or truncated" in cache.error(ref.key)
    assert stack.cache.counters.load_failures >= 2

    nope = AdapterRef(name="nope")  # what the scheduler asks through the AdapterSlots protocol
    ref = AdapterRef(name=MIXED_CASES[1].name)
    assert manager.readiness(ref) == "loading" and cache.state(ref.key) == "missing"  # reports only
    manager.prefetch([nope, ref])  # the scheduler's step: loads start here
    assert _wait(cache, nope) == "error" and _wait(cache, ref) == "ready"
    assert manager.readiness(nope) == "error" and "not found" in manager.load_error(nope)
    assert manager.readiness(ref) == "ready"
    stack.close()


@torch.inference_mode()
def test_composition_is_a_cached_virtual_adapter(tiny_llama_dir, store, prompts):
    model, stack = _stack(tiny_llama_dir, store, max_loras=2)
    names = [MIXED_CASES[0].name, MIXED_CASES[1].name]
    ref = AdapterRef(weights={names[0]: 0.5, names[1]: -1.0})
    stack.cache.prefetch(ref)
    assert _wait(stack.cache, ref) == "ready"
    [got] = _step(model, stack.manager, [(ref.key, prompts[0])])

    ref_model = load_base(tiny_llama_dir)
    spec = BaseModelSpec.from_model(ref_model)
    handle = inject_lora(ref_model, TorchLoRABackend(1), 64)
    from server.lora.adapter import load_peft_adapter

    parts = [(load_peft_adapter(store / n, n, spec, 64), w) for n, w in sorted(ref.weights.items())]
    handle.set_slot(0, compose_adapters(parts, ref.key))
    handle.backend.plan([0], [LENGTH])
    assert max_rel_err(got, ref_model(input_ids=prompts[0]).logits) < TOL

    dora = AdapterRef(weights={names[0]: 1.0, "dora-r8": 1.0})
    stack.cache.prefetch(dora)
    assert _wait(stack.cache, dora) == "error" and "uses DoRA" in stack.cache.error(dora.key)
    stack.close()


@torch.inference_mode()
def test_reload_in_place_and_unload_after_in_flight_requests(tiny_llama_dir, store, tmp_path, prompts):
    model, stack = _stack(tiny_llama_dir, store, max_loras=2)
    manager = stack.manager
    service = _service(stack, store, allowed_lora_roots=[tmp_path])
    path = make_peft_adapter(tiny_llama_dir, tmp_path / "ext", r=4, seed=31)
    asyncio.run(service.load("ext", str(path)))
    manager.pin("ext")
    [before] = _step(model, manager, [("ext", prompts[1])])
    assert max_rel_err(before, peft_logits(tiny_llama_dir, path, prompts[1])) < TOL

    shutil.rmtree(path)
    make_peft_adapter(tiny_llama_dir, path, r=40, seed=32)  # new weights, new rank, same place
    asyncio.run(service.load("ext", str(path), inplace=True))
    [after] = _step(model, manager, [("ext", prompts[1])])  # the slot is rewritten in place, on 3 pages
    assert max_rel_err(after, peft_logits(tiny_llama_dir, path, prompts[1])) < TOL
    assert max_rel_err(after, before) > 1e-2

    asyncio.run(service.unload("ext"))
    assert not stack.catalog.exists("ext") and stack.cache.state("ext") == "missing"
    [still] = _step(model, manager, [("ext", prompts[1])])  # in flight: finishes on its weights
    assert max_rel_err(still, after) == 0.0 and manager.resident() == ["ext"]
    manager.unpin("ext")
    assert manager.resident() == []
    stack.close()


@torch.inference_mode()
def test_a_reload_at_a_higher_rank_waits_for_pages_when_the_memory_is_pinned_full(
    tiny_llama_dir, store, tmp_path, prompts
):
    """4 pages, all pinned by running requests; one of them reloaded at rank 40 (3 pages): its
    requests keep the old weights (no failed step), no new request of it is admitted (fits counts
    the new need), and it is refilled once pages free up."""
    model, stack = _stack(tiny_llama_dir, store, max_loras=1)
    manager = stack.manager
    service = _service(stack, store, allowed_lora_roots=[tmp_path])
    path = make_peft_adapter(tiny_llama_dir, tmp_path / "ext", r=4, seed=33)
    asyncio.run(service.load("ext", str(path)))
    others = ["attn-r4", "all-r8-rslora", "dora-r8"]  # one page each
    for key in ["ext", *others]:
        assert _ready(manager, key)
        manager.pin(key)
    rows = [("ext", prompts[1]), *[(k, prompts[1]) for k in others]]
    before = _step(model, manager, rows)[0]
    shutil.rmtree(path)
    make_peft_adapter(tiny_llama_dir, path, r=40, seed=34)
    asyncio.run(service.load("ext", str(path), inplace=True))
    assert manager.readiness(AdapterRef(name="ext")) == "ready"
    assert not manager.fits({"ext"})  # 3 pages now, beside 3 pinned ones
    still = _step(model, manager, rows)[0]
    assert max_rel_err(still, before) == 0.0  # the old weights, no error
    for key in others:
        manager.unpin(key)
    [after] = _step(model, manager, [("ext", prompts[1])])
    assert max_rel_err(after, peft_logits(tiny_llama_dir, path, prompts[1])) < TOL
    manager.unpin("ext")
    stack.close()


def test_concurrent_prefetch_reload_while_the_engine_activates(tiny_llama_dir, store, prompts, expected):
    """Host-tier calls from other threads never corrupt what the engine thread serves."""
    model, stack = _stack(tiny_llama_dir, store, max_loras=2, max_cpu_loras=3)
    names = [c.name for c in MIXED_CASES[:6]]
    stop = threading.Event()
    errors: list[BaseException] = []

    def hammer(seed):
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                name = rng.choice(names)
                stack.cache.prefetch(AdapterRef(name=name))
                stack.cache.state(name)
                if rng.random() < 0.1:  # reload in place
                    stack.cache.replace(name, stack.reader.read(name))
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        for step in range(8):
            pair = [names[step % 6], names[(step + 1) % 6]]
            outputs = _step(
                model, stack.manager, [(pair[0], prompts[0]), (None, prompts[2]), (pair[1], prompts[3])]
            )
            assert max_rel_err(outputs[0], expected[(pair[0], 0)]) < TOL
            assert max_rel_err(outputs[1], expected[(None, 2)]) < TOL
            assert max_rel_err(outputs[2], expected[(pair[1], 3)]) < TOL
    finally:
        stop.set()
        for t in threads:
            t.join()
        stack.close()
    assert not errors
