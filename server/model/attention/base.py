"""The attention seam: one backend object per process, planned once per step, run once per layer.

The engine describes a step's packed batch once (``StepLayout``): small device tensors that are
views into the model runner's persistent step buffers, their host mirrors, and a few host integers
known without asking the device. The backend turns that into whatever its kernels need in ``plan``
(host work only, shared by every layer), then ``forward`` runs per layer with no host work. The
backend also owns the paged KV cache, because its layout is the kernel's business. This is
FlashInfer's wrapper shape; Triton and FlashInfer plug in here without touching the model runner.

Padding rows (decode batches padded to a CUDA-graph bucket) write their K/V into the cache's last
block, which the block manager never hands out (``padding_block``), and attend to it alone, so every
kernel sees well-formed rows and no backend needs a mask for them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property

import torch

from server.model.geometry import ModelGeometry


@dataclass(frozen=True)
class SeqSpan:
    """One sequence's rows in the packed batch and its KV context after this step (host values)."""

    start: int  # first row of its new tokens in the packed batch
    num_tokens: int  # new tokens this step (a prefill chunk, or 1 for decode)
    context_len: int  # tokens in the cache once this step's are written (cached prefix + new)
    block_table: list[int]  # its KV blocks, in order


@dataclass(frozen=True)
class StepTensors:
    """The step's attention metadata as int32 tensors (sequence i's rows are
    ``query_start[i]:query_start[i + 1]``; ``slot_mapping[r]`` is the flat KV slot
    ``block * block_size + offset`` that row r's key and value are written to)."""

    query_start: torch.Tensor  # [num_seqs + 1]
    context_lens: torch.Tensor  # [num_seqs], cached prefix + this step's tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq], rows padded with stale entries
    slot_mapping: torch.Tensor  # [num_tokens]


@dataclass(frozen=True)
class StepLayout:
    """The packed batch of one step as attention sees it.

    ``device`` views stay at the same addresses every step (a captured CUDA graph reads the next
    step's values from them); ``host`` holds the same values on the CPU for backends that plan on the
    host. ``static`` marks a decode step padded to a graph bucket: kernels must then size their
    launches from the bucket and fixed limits only, never from this step's lengths, so one captured
    launch serves every later step of that bucket.
    """

    num_seqs: int
    num_tokens: int
    max_query_len: int
    max_context_len: int
    block_size: int
    device: StepTensors
    host: StepTensors
    static: bool = False

    @property
    def is_decode(self) -> bool:
        """Every sequence brings exactly one new token."""
        return self.max_query_len == 1

    @cached_property
    def spans(self) -> list[SeqSpan]:
        """Per-sequence host view (for backends that loop over sequences on the host)."""
        starts = self.host.query_start[: self.num_seqs + 1].tolist()
        lens = self.host.context_lens[: self.num_seqs].tolist()
        tables = self.host.block_tables[: self.num_seqs]
        return [
            SeqSpan(start, end - start, ctx, tables[i, : -(-ctx // self.block_size)].tolist())
            for i, (start, end, ctx) in enumerate(zip(starts, starts[1:], lens, strict=False))
        ]

    @classmethod
    def from_spans(
        cls, spans: list[SeqSpan], block_size: int, device, static: bool = False, max_blocks: int = 0
    ) -> StepLayout:
        """A layout from host spans (tests and tools; the engine fills persistent buffers instead), its
        block tables ``max_blocks`` wide (at least the longest)."""
        width = max(max_blocks, *(len(s.block_table) for s in spans))
        starts = [0]
        slots: list[int] = []
        for s in spans:
            starts.append(starts[-1] + s.num_tokens)
            for pos in range(s.context_len - s.num_tokens, s.context_len):
                slots.append(s.block_table[pos // block_size] * block_size + pos % block_size)
        host = StepTensors(
            torch.tensor(starts, dtype=torch.int32),
            torch.tensor([s.context_len for s in spans], dtype=torch.int32),
            torch.tensor(
                [s.block_table + [0] * (width - len(s.block_table)) for s in spans], dtype=torch.int32
            ),
            torch.tensor(slots, dtype=torch.int32),
        )
        on_device = StepTensors(*(t.to(device) for t in vars(host).values()))
        return cls(
            num_seqs=len(spans),
            num_tokens=len(slots),
            max_query_len=max(s.num_tokens for s in spans),
            max_context_len=max(s.context_len for s in spans),
            block_size=block_size,
            device=on_device,
            host=host,
            static=static,
        )


class UnsupportedModelError(ValueError):
    """The model needs an attention feature this backend does not implement (raised at start-up)."""


class AttentionBackend(ABC):
    """Paged attention over a KV cache it owns. ``plan`` once per step, ``forward`` per layer."""

    name: str
    # True when, for a ``static`` layout, plan writes nothing the kernels read except into buffers
    # that live as long as the backend, and forward launches the same kernels every step.
    supports_cuda_graphs: bool = False

    def __init__(self, geometry: ModelGeometry, num_blocks: int, block_size: int, dtype, device) -> None:
        self.geometry = geometry
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.check_model(geometry)
        self.kv_caches = self.allocate_kv_cache(dtype)

    @property
    def padding_block(self) -> int:
        """The block padding rows write to; the engine hands out only blocks below it."""
        return self.num_blocks - 1

    @staticmethod
    def kv_bytes_per_block(geometry: ModelGeometry, block_size: int, dtype: torch.dtype) -> int:
        """K and V of one block across all layers: what sizing the cache from a memory budget needs."""
        elem = torch.tensor([], dtype=dtype).element_size()
        return 2 * geometry.num_layers * block_size * geometry.num_kv_heads * geometry.head_dim * elem

    def check_model(self, geometry: ModelGeometry) -> None:  # noqa: B027 - optional hook, no check by default
        """Raises ``UnsupportedModelError`` naming what this backend cannot do for the model."""

    def allocate_kv_cache(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """One cache tensor per layer, in this backend's layout. By default
        ``[2 (K, V), num_blocks, block_size, kv_heads, head_dim]``, which the Triton and FlashInfer
        ("NHD") kernels read as they are."""
        g = self.geometry
        shape = (2, self.num_blocks, self.block_size, g.num_kv_heads, g.head_dim)
        return [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(g.num_layers)]

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
