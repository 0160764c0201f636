"""The host tier of adapter residency: parsed adapters in a bounded LRU, loaded in the background.

Safe to call from any thread (one lock guards the state). Every adapter name carries an epoch,
bumped whenever its weights may have changed (reload, unload, a new path, a new upload): a load that
finishes after its epoch moved on is discarded, and the device tier compares epochs to spot stale
slots and stale prefix-cache identities (``generation`` counts every bump). Compositions
(``AdapterRef.weights``) are cached as virtual adapters under ``AdapterRef.key``, with the tuple of
their parts' epochs as theirs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from server.lora.adapter import LoRAAdapter
from server.lora.compose import compose_adapters
from server.lora.counters import LoRACounters
from server.lora.errors import AdapterError
from server.lora.reader import AdapterReader
from server.lora.ref import AdapterRef, names_in_key

HostState = Literal["ready", "loading", "error", "missing"]


class HostCache:
    def __init__(
        self,
        reader: AdapterReader,
        max_cpu_loras: int,
        max_rank: int,
        counters: LoRACounters,
        workers: int = 2,
    ) -> None:
        self.reader = reader
        self.max_cpu_loras = max_cpu_loras
        self.max_rank = max_rank
        self.counters = counters
        self.lock = threading.RLock()
        self.load_ended = threading.Condition(self.lock)  # notified whenever a background load ends
        self._refs: dict[str, AdapterRef] = {}  # key -> ref, so compositions can be rebuilt
        self._epochs: dict[str, int] = {}
        self._lru: OrderedDict[str, tuple[LoRAAdapter, object]] = OrderedDict()  # key -> (adapter, epoch)
        self._loading: dict[str, object] = {}  # key -> epoch of the load in flight
        self._errors: dict[str, str] = {}
        self.generation = 0  # bumped with any epoch
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lora-load")

    # --- state --------------------------------------------------------------------------------
    def state(self, key: str) -> HostState:
        with self.lock:
            if key in self._lru:
                return "ready"
            if key in self._loading:
                return "loading"
            return "error" if key in self._errors else "missing"

    def error(self, key: str) -> str | None:
        with self.lock:
            return self._errors.get(key)

    def epoch_of(self, key: str) -> object:
        with self.lock:
            names = names_in_key(key)
            if names == [key]:
                return self._epochs.get(key, 0)
            return tuple(self._epochs.get(n, 0) for n in names)

    def peek(self, key: str) -> tuple[LoRAAdapter, object] | None:
        """The current host copy of ``key`` and its epoch, or None; never loads."""
        with self.lock:
            cached = self._cached(key)
            return None if cached is None else (cached, self.epoch_of(key))

    def keys_using(self, name: str, keys: list[str] | None = None) -> list[str]:
        """Keys (of ``keys``, default: all known) that are ``name`` or a composition containing it."""
        with self.lock:
            candidates = [name, *self._refs] if keys is None else keys
            return sorted({k for k in candidates if name in names_in_key(k)})

    # --- loading ------------------------------------------------------------------------------
    def prefetch(self, ref: AdapterRef) -> None:
        """Starts a background disk -> host load of ``ref`` unless it is cached or already loading."""
        key = ref.key
        with self.lock:
            if ref.weights:  # a composition, rebuilt from its parts; a plain name needs no entry
                self._refs[key] = ref
            epoch = self.epoch_of(key)
            if self._cached(key) is not None or self._loading.get(key) == epoch:
                return
            self._errors.pop(key, None)
            self._loading[key] = epoch
        self._pool.submit(self._load_task, key, epoch)

    def get(self, key: str) -> tuple[LoRAAdapter, object]:
        """The current host copy of ``key`` and its epoch, loading synchronously if not cached."""
        with self.lock:
            cached, epoch = self._cached(key), self.epoch_of(key)
        if cached is None:
            cached = self._build(key)
            with self.lock:
                self._put(key, cached, epoch)
        return cached, epoch

    def replace(self, name: str, adapter: LoRAAdapter) -> None:
        """``adapter`` (parsed and validated by the caller) is now what ``name`` serves."""
        with self.lock:
            self.invalidate(name)
            self._put(name, adapter, self.epoch_of(name))

    def invalidate(self, name: str) -> None:
        """Bumps ``name``'s epoch and drops its (and its compositions') host copies and errors."""
        with self.lock:
            self._epochs[name] = self._epochs.get(name, 0) + 1
            self.generation += 1
            for key in self.keys_using(name, list(self._lru) + list(self._errors)):
                self._lru.pop(key, None)
                self._errors.pop(key, None)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # --- internals ----------------------------------------------------------------------------
    def _cached(self, key: str) -> LoRAAdapter | None:
        entry = self._lru.get(key)
        if entry is None or entry[1] != self.epoch_of(key):
            return None
        self._lru.move_to_end(key)
        return entry[0]

    def _put(self, key: str, adapter: LoRAAdapter, epoch: object) -> None:
        if epoch != self.epoch_of(key):
            return  # reloaded or unloaded while this load ran: stale
        self._lru[key] = (adapter, epoch)
        self._lru.move_to_end(key)
        while len(self._lru) > self.max_cpu_loras:
            self._lru.popitem(last=False)
            self.counters.add(cpu_evictions=1)

    def _get_or_read(self, name: str) -> LoRAAdapter:
        with self.lock:
            cached, epoch = self._cached(name), self.epoch_of(name)
        if cached is not None:
            return cached
        adapter = self.reader.read(name)
        with self.lock:
            self._put(name, adapter, epoch)
        return adapter

    def _build(self, key: str) -> LoRAAdapter:
        with self.lock:
            ref = self._refs.get(key)
        if ref is None or not ref.weights:
            return self._get_or_read(key)
        parts = [(self._get_or_read(n), w) for n, w in sorted(ref.weights.items())]
        adapter = compose_adapters(parts, key, self.max_rank)
        self.reader.lora.check(adapter)
        return adapter

    def _load_task(self, key: str, epoch: object) -> None:
        try:
            adapter = self._build(key)
            with self.lock:
                self._put(key, adapter, epoch)
        except Exception as exc:  # reported per adapter: only its own requests fail
            with self.lock:
                if self.epoch_of(key) == epoch:
                    self._errors[key] = (
                        str(exc) if isinstance(exc, AdapterError) else f"{type(exc).__name__}: {exc}"
                    )
        finally:
            with self.lock:
                if self._loading.get(key) == epoch:
                    del self._loading[key]
                self.load_ended.notify_all()
