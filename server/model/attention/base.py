"""The attention seam: one backend object per process, planned once per step, run once per layer.

The engine describes a step's packed batch once (``StepLayout``: host lists). The backend turns it
into whatever its kernels need in ``plan`` (all host work and host-to-device copies, once per step,
shared by every layer), then ``forward`` runs per layer with no host work. The backend also owns
the paged KV cache, because its layout is the kernel's business. This is FlashInfer's wrapper shape;
the GPU backends (Triton, FlashInfer) plug in here without touching the model runner.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from server.model.geometry import ModelGeometry


@dataclass(frozen=True)
class SeqSpan:
    """One sequence's rows in the packed batch and its KV context after this step."""

    start: int  # first row of its new tokens in the packed batch
    num_tokens: int  # new tokens this step (a prefill chunk, or 1 for decode)
    context_len: int  # tokens in the cache once this step's are written (cached prefix + new)
    block_table: list[int]  # its KV blocks, in order


@dataclass(frozen=True)
class StepLayout:
    """The packed batch of one step as attention sees it; ``slot_mapping[i]`` is the flat KV slot
    (``block * block_size + offset``) that row i's key and value are written to."""

    spans: list[SeqSpan]
    slot_mapping: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.slot_mapping)


class AttentionBackend(ABC):
    """Paged attention over a KV cache it owns. ``plan`` once per step, ``forward`` per layer."""

    name: str

    def __init__(self, geometry: ModelGeometry, num_blocks: int, block_size: int, dtype, device) -> None:
        self.geometry = geometry
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = torch.device(device)
        self.kv_caches = self.allocate_kv_cache(dtype)

    @staticmethod
    def kv_bytes_per_block(geometry: ModelGeometry, block_size: int, dtype: torch.dtype) -> int:
        """K and V of one block across all layers: what sizing the cache from a memory budget needs."""
        elem = torch.tensor([], dtype=dtype).element_size()
        return 2 * geometry.num_layers * block_size * geometry.num_kv_heads * geometry.head_dim * elem

    @abstractmethod
    def allocate_kv_cache(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """One cache tensor per layer, in this backend's layout."""

    @abstractmethod
    def plan(self, layout: StepLayout) -> None:
        """Prepares this step's metadata for every layer's ``forward``."""

    @abstractmethod
    def forward(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float | None,
        sliding_window: int | None,
        softcap: float | None,
    ) -> torch.Tensor:
        """Writes this step's K/V into the cache and attends: query [1, H, T, D], key/value
        [1, KVH, T, D] (HF's layout) -> [1, T, H, D]."""
