"""Adapter residency: host LRU, device slots with pins and LRU eviction, background loads, reload/unload.

Outputs are checked against PEFT while only 2 device slots serve 6 adapters, so every eviction and
re-activation has to copy exactly the right weights back.
"""

from __future__ import annotations

import random
import shutil
import threading
import time

import pytest
import torch

from server.engine.types import AdapterRef
from server.lora.compose import compose_adapters
from server.lora.layers import inject_lora
from server.lora.manager import AdapterManager
from server.lora.spec import BaseModelSpec
from tests.lora_fixtures import (
    MIXED_CASES,
    load_base,
    make_mixed_adapters,
    make_peft_adapter,
    max_rel_err,
    peft_logits,
    single_torch_thread,  # noqa: F401 - autouse fixture
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


def _manager(base_dir, store, max_loras=2, max_cpu_loras=8, max_rank=64):
    model = load_base(base_dir)
    spec = BaseModelSpec.from_model(model)
    handle = inject_lora(model, max_loras=max_loras, max_rank=max_rank, backend="torch")
    manager = AdapterManager(handle, store, spec, max_loras, max_cpu_loras, max_rank, "cpu", torch.float32)
    return model, manager


def _wait(manager, ref, timeout=30.0):
    deadline = time.monotonic() + timeout
    while manager.state(ref) == "loading" and time.monotonic() < deadline:
        time.sleep(0.01)
    return manager.state(ref)


def _gate_ready(gate, key, timeout=30.0) -> bool:
    """Waits as the scheduler would (status() re-fetches what the host LRU dropped); False on error."""

    class Seq:
        adapter = AdapterRef(name=key)

    deadline = time.monotonic() + timeout
    while (status := gate.status(Seq)) == "loading" and time.monotonic() < deadline:
        time.sleep(0.01)
    return status == "ready"


@torch.inference_mode()
def _step(model, manager, rows):
    """One engine step over ``rows`` = [(adapter key or None, prompt ids)]; returns per-row logits."""
    keys = {k for k, _ in rows if k}
    slots = manager.activate(keys) if keys else {}
    manager.set_batch([slots[k] if k else -1 for k, _ in rows], [LENGTH] * len(rows))
    logits = model(input_ids=torch.cat([ids for _, ids in rows])).logits
    return [logits[i : i + 1] for i in range(len(rows))]


@pytest.mark.parametrize("max_cpu_loras", [8, 2])
def test_two_slots_six_adapters_in_flight_keep_outputs_identical(
    tiny_llama_dir, store, prompts, expected, max_cpu_loras
):
    """A mini scheduler: FIFO admission while the adapters fit in the slots, pin while running."""
    model, manager = _manager(tiny_llama_dir, store, max_loras=2, max_cpu_loras=max_cpu_loras)
    names = [c.name for c in MIXED_CASES[:6]]
    rng = random.Random(0)
    waiting = [(names[i % 6] if i % 5 else None, i % len(prompts), rng.randint(1, 3)) for i in range(18)]
    for key, _, _ in waiting:
        if key:
            manager.prefetch(AdapterRef(name=key))
    running: list[list] = []
    gate = manager.gate()
    checked = 0
    while waiting or running:
        active = {r[0] for r in running if r[0]}
        while waiting:
            key = waiting[0][0]
            if key and (not _gate_ready(gate, key) or not manager.can_activate(active | {key})):
                break
            running.append(list(waiting.pop(0)))
            if key:
                manager.pin(key)
                active.add(key)
        outputs = _step(model, manager, [(key, prompts[p]) for key, p, _ in running])
        assert len(manager.resident()) <= 2
        for request, logits in zip(running, outputs, strict=True):
            assert max_rel_err(logits, expected[(request[0], request[1])]) < TOL, request
            checked += 1
            request[2] -= 1
        for request in [r for r in running if r[2] == 0]:
            running.remove(request)
            if request[0]:
                manager.unpin(request[0])
    counters = manager.counters_snapshot()
    assert checked >= 18 and counters.evictions >= 4 and counters.activations >= 6
    assert counters.load_seconds > 0 and counters.load_failures == 0
    if max_cpu_loras >= 6:
        assert counters.loads == 6  # each adapter parsed once; slots refill from host memory
    else:
        assert counters.loads > 6 and counters.cpu_evictions > 0
    manager.close()


def test_pins_block_eviction_and_lru_picks_the_victim(tiny_llama_dir, store):
    _, manager = _manager(tiny_llama_dir, store, max_loras=2)
    a, b, c = (x.name for x in MIXED_CASES[:3])
    slot_a = manager.activate({a})[a]
    manager.activate({b})
    assert manager.activate({a}) == {a: slot_a}  # resident: no copy, a becomes most recent
    activations = manager.counters.activations
    manager.activate({c})  # evicts b, the least recently used
    assert manager.resident() == sorted([a, c]) and manager.counters.activations == activations + 1
    manager.pin(a)
    manager.pin(c)
    assert not manager.can_activate({b}) and manager.can_activate({a, c})
    with pytest.raises(RuntimeError, match="do not fit in 2 slots"):
        manager.activate({b})
    manager.unpin(c)
    assert manager.can_activate({b})
    assert manager.activate({b, a}) == {a: slot_a, b: 1 - slot_a}  # c evicted, pinned a kept
    with pytest.raises(RuntimeError, match="without a matching pin"):
        manager.unpin(c)
    manager.close()


def test_background_load_states_and_errors(tiny_llama_dir, store, tmp_path):
    _, manager = _manager(tiny_llama_dir, store)
    good = AdapterRef(name=MIXED_CASES[0].name)
    assert manager.state(good) == "missing"
    manager.prefetch(good)
    assert _wait(manager, good) == "ready" and manager.error(good) is None

    missing = AdapterRef(name="nope")
    assert not manager.exists("nope")
    manager.prefetch(missing)
    assert _wait(manager, missing) == "error" and manager.error(missing) == "adapter 'nope' not found"

    broken = tmp_path / "broken"
    shutil.copytree(store / good.name, broken)
    data = (broken / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[:100])
    manager.register_path("broken", broken)
    assert manager.exists("broken") and "broken" in manager.list_names()
    ref = AdapterRef(name="broken")
    manager.prefetch(ref)
    assert _wait(manager, ref) == "error"
    assert "adapter_model.safetensors is corrupt or truncated" in manager.error(ref)
    assert manager.counters.load_failures >= 2

    class Seq:  # what the scheduler hands the gate
        adapter = AdapterRef(name="nope")

    gate = manager.gate()
    assert gate.status(Seq) == "error" and "not found" in gate.error(Seq)
    Seq.adapter = AdapterRef(name=MIXED_CASES[1].name)
    assert gate.status(Seq) in ("loading", "ready") and _wait(manager, Seq.adapter) == "ready"
    assert gate.status(Seq) == "ready"
    manager.close()


@torch.inference_mode()
def test_composition_is_a_cached_virtual_adapter(tiny_llama_dir, store, prompts):
    model, manager = _manager(tiny_llama_dir, store, max_loras=2)
    names = [MIXED_CASES[0].name, MIXED_CASES[1].name]
    ref = AdapterRef(weights={names[0]: 0.5, names[1]: -1.0})
    manager.prefetch(ref)
    assert _wait(manager, ref) == "ready"
    [got] = _step(model, manager, [(ref.key, prompts[0])])

    ref_model = load_base(tiny_llama_dir)
    spec = BaseModelSpec.from_model(ref_model)
    handle = inject_lora(ref_model, 1, 64)
    from server.lora.adapter import load_peft_adapter

    parts = [(load_peft_adapter(store / n, n, spec, 64), w) for n, w in sorted(ref.weights.items())]
    handle.set_slot(0, compose_adapters(parts, ref.key))
    handle.set_batch([0], [LENGTH])
    assert max_rel_err(got, ref_model(input_ids=prompts[0]).logits) < TOL

    dora = AdapterRef(weights={names[0]: 1.0, "dora-r8": 1.0})
    manager.prefetch(dora)
    assert _wait(manager, dora) == "error" and "uses DoRA" in manager.error(dora)
    manager.close()


@torch.inference_mode()
def test_reload_in_place_and_unload_after_in_flight_requests(tiny_llama_dir, store, tmp_path, prompts):
    model, manager = _manager(tiny_llama_dir, store, max_loras=2)
    path = make_peft_adapter(tiny_llama_dir, tmp_path / "ext", r=4, seed=31)
    manager.register_path("ext", path)
    manager.load_now("ext")
    manager.pin("ext")
    [before] = _step(model, manager, [("ext", prompts[1])])
    assert max_rel_err(before, peft_logits(tiny_llama_dir, path, prompts[1])) < TOL

    shutil.rmtree(path)
    make_peft_adapter(tiny_llama_dir, path, r=8, seed=32)  # new weights, new rank, same place
    manager.reload("ext")
    [after] = _step(model, manager, [("ext", prompts[1])])  # the slot is rewritten in place
    assert max_rel_err(after, peft_logits(tiny_llama_dir, path, prompts[1])) < TOL
    assert max_rel_err(after, before) > 1e-2

    manager.unload("ext")
    assert not manager.exists("ext") and manager.state(AdapterRef(name="ext")) == "missing"
    [still] = _step(model, manager, [("ext", prompts[1])])  # in flight: finishes on its weights
    assert max_rel_err(still, after) == 0.0 and manager.resident() == ["ext"]
    manager.unpin("ext")
    assert manager.resident() == []
    manager.close()


def test_concurrent_prefetch_reload_while_the_engine_activates(tiny_llama_dir, store, prompts, expected):
    """Host-tier calls from other threads never corrupt what the engine thread serves."""
    model, manager = _manager(tiny_llama_dir, store, max_loras=2, max_cpu_loras=3)
    names = [c.name for c in MIXED_CASES[:6]]
    stop = threading.Event()
    errors: list[BaseException] = []

    def hammer(seed):
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                name = rng.choice(names)
                manager.prefetch(AdapterRef(name=name))
                manager.state(AdapterRef(name=name))
                if rng.random() < 0.1:
                    manager.reload(name)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        for step in range(8):
            pair = [names[step % 6], names[(step + 1) % 6]]
            outputs = _step(
                model, manager, [(pair[0], prompts[0]), (None, prompts[2]), (pair[1], prompts[3])]
            )
            assert max_rel_err(outputs[0], expected[(pair[0], 0)]) < TOL
            assert max_rel_err(outputs[1], expected[(None, 2)]) < TOL
            assert max_rel_err(outputs[2], expected[(pair[1], 3)]) < TOL
    finally:
        stop.set()
        for t in threads:
            t.join()
        manager.close()
    assert not errors
