"""The host tier of adapter residency: names in the store, parsed adapters in a bounded LRU, and
background loading, all safe to call from any thread (one lock guards the state).

Every adapter name carries an epoch, bumped by reload/unload/re-registration: a load that finishes
after its epoch moved on is discarded, and the device tier compares epochs to spot stale slots.
Compositions (``AdapterRef.weights``) are cached as virtual adapters under ``AdapterRef.key``.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from server.config import ADAPTER_NAME_PATTERN
from server.engine.types import AdapterRef
from server.lora.adapter import CONFIG_FILE, LoRAAdapter, load_peft_adapter
from server.lora.compose import compose_adapters
from server.lora.errors import AdapterError
from server.lora.layers import LoRAModel
from server.lora.spec import BaseModelSpec

AdapterState = Literal["ready", "loading", "error", "missing"]


@dataclass
class LoRACounters:
    """Monotonic counters for metrics (read by ``server.metrics``)."""

    loads: int = 0
    load_failures: int = 0
    load_seconds: float = 0.0
    activations: int = 0  # slot writes
    evictions: int = 0  # slot evictions of an unpinned adapter
    cpu_evictions: int = 0


class AdapterHost:
    def __init__(
        self,
        lora: LoRAModel,
        store_dir: Path,
        base: BaseModelSpec,
        max_cpu_loras: int,
        max_rank: int,
        workers: int = 2,
    ) -> None:
        self.lora = lora
        self.store_dir = Path(store_dir)
        self.base = base
        self.max_cpu_loras = max_cpu_loras
        self.max_rank = max_rank
        self.counters = LoRACounters()
        self.lock = threading.RLock()
        self._paths: dict[str, Path] = {}  # registered outside the store (load_lora_adapter)
        self._refs: dict[str, AdapterRef] = {}  # key -> ref, so compositions can be rebuilt
        self._epochs: dict[str, int] = {}
        self._cpu: OrderedDict[str, tuple[LoRAAdapter, object]] = OrderedDict()  # key -> (adapter, epoch)
        self._loading: dict[str, object] = {}  # key -> epoch of the load in flight
        self._errors: dict[str, str] = {}
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lora-load")

    # --- names --------------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        with self.lock:
            if name in self._paths:
                return True
        return (
            bool(re.fullmatch(ADAPTER_NAME_PATTERN, name)) and (self.store_dir / name / CONFIG_FILE).is_file()
        )

    def list_names(self) -> list[str]:
        found = self.store_dir.glob(f"*/{CONFIG_FILE}") if self.store_dir.is_dir() else []
        on_disk = {p.parent.name for p in found if re.fullmatch(ADAPTER_NAME_PATTERN, p.parent.name)}
        with self.lock:
            return sorted(on_disk | set(self._paths))

    def path_of(self, name: str) -> Path:
        with self.lock:
            if name in self._paths:
                return self._paths[name]
        if not self.exists(name):
            raise KeyError(f"adapter '{name}' not found")
        return self.store_dir / name

    def register_path(self, name: str, path: Path) -> None:
        if not re.fullmatch(ADAPTER_NAME_PATTERN, name):
            raise AdapterError(f"invalid adapter name {name!r}")
        path = Path(path)
        if not path.is_dir():
            raise AdapterError(f"adapter '{name}': directory {path} does not exist")
        with self.lock:
            if self._paths.get(name) != path:
                self.invalidate(name)
            self._paths[name] = path

    def forget_path(self, name: str) -> None:
        with self.lock:
            self._paths.pop(name, None)

    # --- loading ------------------------------------------------------------------------------
    def prefetch(self, ref: AdapterRef) -> None:
        key = ref.key
        if key is None:
            return
        with self.lock:
            self._refs[key] = ref
            epoch = self.epoch_of(key)
            if self._cached(key) is not None or self._loading.get(key) == epoch:
                return
            self._errors.pop(key, None)
            self._loading[key] = epoch
        self._pool.submit(self._load_task, key, epoch)

    def state(self, key: str | None) -> AdapterState:
        with self.lock:
            if key in self._cpu:
                return "ready"
            if key in self._loading:
                return "loading"
            return "error" if key in self._errors else "missing"

    def error(self, key: str | None) -> str | None:
        with self.lock:
            return self._errors.get(key)

    def get(self, key: str) -> tuple[LoRAAdapter, object]:
        """The current host copy of ``key`` and its epoch, loading synchronously if not cached."""
        with self.lock:
            cached, epoch = self._cached(key), self.epoch_of(key)
        if cached is None:
            cached = self._build(key)
            with self.lock:
                self._put(key, cached, epoch)
        return cached, epoch

    def reload(self, name: str) -> None:
        adapter = self._read(name)  # validate before dropping the old weights
        with self.lock:
            self.invalidate(name)
            self._put(name, adapter, self.epoch_of(name))

    def invalidate(self, name: str) -> None:
        """Bumps ``name``'s epoch and drops its (and its compositions') host copies and errors."""
        with self.lock:
            self._epochs[name] = self._epochs.get(name, 0) + 1
            for key in self.keys_using(name, list(self._cpu) + list(self._errors)):
                self._cpu.pop(key, None)
                self._errors.pop(key, None)

    def keys_using(self, name: str, keys: list[str] | None = None) -> list[str]:
        """Keys (of ``keys``, default: all known) that are ``name`` or a composition containing it."""
        with self.lock:
            candidates = [name, *self._refs] if keys is None else keys
            return sorted({k for k in candidates if k == name or name in self._parts(k)})

    def epoch_of(self, key: str) -> object:
        with self.lock:
            parts = self._parts(key)
            return (
                self._epochs.get(key, 0) if parts == [key] else tuple(self._epochs.get(p, 0) for p in parts)
            )

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # --- internals ----------------------------------------------------------------------------
    def _parts(self, key: str) -> list[str]:
        ref = self._refs.get(key)
        return sorted(ref.weights) if ref is not None and ref.weights else [key]

    def _cached(self, key: str) -> LoRAAdapter | None:
        entry = self._cpu.get(key)
        if entry is None or entry[1] != self.epoch_of(key):
            return None
        self._cpu.move_to_end(key)
        return entry[0]

    def _put(self, key: str, adapter: LoRAAdapter, epoch: object) -> None:
        if epoch != self.epoch_of(key):
            return  # reloaded or unloaded while this load ran: stale
        self._cpu[key] = (adapter, epoch)
        self._cpu.move_to_end(key)
        while len(self._cpu) > self.max_cpu_loras:
            self._cpu.popitem(last=False)
            self.counters.cpu_evictions += 1

    def _read(self, name: str) -> LoRAAdapter:
        """Disk -> validated host copy (not cached); counts loads and their time."""
        start = time.perf_counter()
        try:
            try:
                path = self.path_of(name)
            except KeyError:
                raise AdapterError(f"adapter '{name}' not found") from None
            adapter = load_peft_adapter(path, name, self.base, self.max_rank)
            self.lora.check(adapter)
        except Exception:
            with self.lock:
                self.counters.load_failures += 1
            raise
        with self.lock:
            self.counters.loads += 1
            self.counters.load_seconds += time.perf_counter() - start
        return adapter

    def _get_or_load(self, name: str) -> LoRAAdapter:
        with self.lock:
            cached, epoch = self._cached(name), self.epoch_of(name)
        if cached is not None:
            return cached
        adapter = self._read(name)
        with self.lock:
            self._put(name, adapter, epoch)
        return adapter

    def _build(self, key: str) -> LoRAAdapter:
        with self.lock:
            ref = self._refs.get(key)
        if ref is None or not ref.weights:
            return self._get_or_load(key)
        parts = [(self._get_or_load(n), w) for n, w in sorted(ref.weights.items())]
        adapter = compose_adapters(parts, key, self.max_rank)
        self.lora.check(adapter)
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
