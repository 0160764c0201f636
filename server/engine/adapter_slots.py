"""What the engine needs from the LoRA side, as a protocol the engine owns.

The engine never imports ``server.lora``: it schedules requests by an opaque adapter handle (only
its ``key`` is read) and asks an ``AdapterSlots`` implementation - ``server.lora.manager.AdapterManager``
satisfies it structurally - whether the weights are ready, whether a set of adapters fits in the
device slots, to pin what running requests use, to prefetch what waiting requests will need, under
which identity their K/V may be cached, and to set up each step's mixed batch.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    import torch

Readiness = Literal["ready", "loading", "error"]


class AdapterHandle(Protocol):
    """A request's adapter (``server.lora.ref.AdapterRef``): the engine reads only its identity."""

    @property
    def key(self) -> str: ...


class AdapterSlots(Protocol):
    """Device-slot residency and the per-step LoRA batch. Called from the engine thread only."""

    @property
    def max_loras(self) -> int: ...

    def readiness(self, adapter: AdapterHandle) -> Readiness:
        """Whether the weights are in host memory (and the adapter's slot is not being written). Only
        reports: loads start in ``prefetch``, which bounds how many are wanted at once."""
        ...

    def load_error(self, adapter: AdapterHandle) -> str | None: ...

    def prefetch(self, adapters: Sequence[AdapterHandle]) -> None:
        """The waiting requests' adapters, most wanted first (``AdmissionOrder.prefetch_order``): start
        loading the first few into host memory (again, if the host cache dropped one), and into device
        slots that are free or hold nothing running or waiting requests use. A request whose adapter
        is being copied into its slot reads as 'loading' until the copy is done."""
        ...

    def idle_wait(self, timeout: float) -> None:
        """Nothing could be scheduled while requests wait on adapter loads or slot copies: block until
        one of those ends (or ``timeout``) instead of spinning, which would hold the GIL the loader
        threads need."""
        ...

    def cache_identity(self, adapter: AdapterHandle) -> Hashable:
        """Names the weights ``adapter`` serves now (the prefix cache keys K/V by it); it changes
        whenever those weights may change: reload, unload, delete, re-upload."""
        ...

    def stale_cache_identities(self) -> list[Hashable]:
        """Identities handed out by ``cache_identity`` whose weights have changed since (each once)."""
        ...

    def fits(self, keys: set[str]) -> bool:
        """Whether ``keys`` can all hold a device slot at once, next to the pinned ones."""
        ...

    def pin(self, key: str) -> None:
        """A request using ``key`` starts running (refcounted): its slot must not be evicted."""
        ...

    def unpin(self, key: str) -> None: ...

    def activate(self, keys: set[str]) -> dict[str, int]:
        """Makes every key resident in a device slot; returns key -> slot."""
        ...

    def bind_step_buffers(self, host: torch.Tensor, device: torch.Tensor) -> None:
        """Two [3, max_num_seqs] int32 views of the model runner's step buffers: ``prepare_batch``
        writes the step's segment table into ``host``, the runner copies it to ``device`` with the
        step's other inputs (one copy), and the LoRA kernels read ``device``."""
        ...

    def prepare_batch(self, seq_slots: list[int], seq_num_tokens: list[int], static: bool = False) -> None:
        """This step's packed batch: sequence i uses slot ``seq_slots[i]`` (-1: base) for its tokens.
        ``static``: a decode step padded to a graph bucket of ``len(seq_slots)`` rows, whose kernel
        launches must depend on that size only."""
        ...

    def graph_safe(self) -> bool:
        """Whether the LoRA work of a static step is a fixed set of launches reading only the bound
        buffers (so a captured graph replays it); false e.g. while a DoRA slot is resident."""
        ...

    def resident(self) -> list[str]: ...
