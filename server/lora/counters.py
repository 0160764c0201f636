"""Lifetime counters of adapter residency, for metrics; updated from loader threads and the engine
thread, so every update and read takes the counters' own lock."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields, replace


@dataclass
class LoRACounters:
    loads: int = 0  # adapters parsed from disk into host memory
    load_failures: int = 0
    load_seconds: float = 0.0
    activations: int = 0  # slot writes
    prefetch_fills: int = 0  # ... of which done off the engine thread, ahead of the request
    slot_hits: int = 0  # requests scheduled whose adapter was already in its device slot
    slot_misses: int = 0  # ... whose adapter was copied into a slot on the engine thread
    evictions: int = 0  # slot evictions of an unpinned adapter
    cpu_evictions: int = 0  # adapters dropped from the host-memory LRU
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: float) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def snapshot(self) -> LoRACounters:
        with self._lock:
            return replace(self, _lock=threading.Lock())

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls) if not f.name.startswith("_")]
