"""Per-step LoRA batch metadata: which rows of the packed batch use which device slot.

One ``LoRABatch`` is owned by the adapter manager (through the injected-model handle) and shared by
every LoRA-wrapped linear of that model; the engine refreshes it once per step before the forward.
Consecutive sequences on the same slot are merged into one segment (SGMV); base-model rows (slot -1)
get no segment at all, so they cost nothing in the LoRA op.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SlotGroups:
    """The LoRA rows regrouped per slot, for batched matmuls over the slot range ``[lo, hi]``.

    Group ``g`` holds the rows of slot ``lo + g`` (from however many segments) in a zero-padded block
    of ``width`` rows: row ``rows[i]`` of the batch goes to padded row ``padded[i]``.
    """

    lo: int
    hi: int
    width: int
    rows: torch.Tensor  # [M] int64, batch rows that use an adapter
    padded: torch.Tensor  # [M] int64, their position in the [(hi - lo + 1) * width] padded layout
    first_row: int  # with ``dense``: the layout is rows [first_row, first_row + M) as they are
    dense: bool  # every slot in [lo, hi] has exactly ``width`` rows, in slot order, back to back


class LoRABatch:
    """Segments ``(start, end, slot)`` over the flattened token rows of the current forward."""

    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self.num_tokens: int | None = None  # None: no batch set, LoRA layers act as the base model
        self.segments: list[tuple[int, int, int]] = []
        self._device_cache: dict[torch.device, torch.Tensor] = {}
        self._groups_cache: dict[torch.device, SlotGroups] = {}

    def set(self, seq_slots: Sequence[int], seq_num_tokens: Sequence[int]) -> None:
        """Sequence i occupies the next ``seq_num_tokens[i]`` rows and uses slot ``seq_slots[i]`` (-1 = none)."""
        if len(seq_slots) != len(seq_num_tokens):
            raise ValueError(f"{len(seq_slots)} slots for {len(seq_num_tokens)} sequences")
        segments: list[tuple[int, int, int]] = []
        row = 0
        for slot, n in zip(seq_slots, seq_num_tokens, strict=True):
            slot, n = int(slot), int(n)
            if n < 0 or not -1 <= slot < self.max_loras:
                raise ValueError(f"invalid sequence: slot {slot} (max_loras={self.max_loras}), {n} tokens")
            if slot >= 0 and n > 0:
                if segments and segments[-1][2] == slot and segments[-1][1] == row:
                    segments[-1] = (segments[-1][0], row + n, slot)
                else:
                    segments.append((row, row + n, slot))
            row += n
        self.num_tokens = row
        self.segments = segments
        self._device_cache = {}
        self._groups_cache = {}

    def clear(self) -> None:
        """Back to "no batch": every row runs the base model."""
        self.num_tokens = None
        self.segments = []
        self._device_cache = {}
        self._groups_cache = {}

    @property
    def max_segment_len(self) -> int:
        return max((end - start for start, end, _ in self.segments), default=0)

    def segment_table(self, device: torch.device) -> torch.Tensor:
        """``[3, S]`` int32 on ``device`` for the kernels: rows ``starts``, ``lens`` and ``slots`` of the
        segments, built once per step. Starts and lengths rather than an indptr because base-model
        rows leave gaps between segments."""
        cached = self._device_cache.get(device)
        if cached is None:
            rows = [[s, e - s, slot] for s, e, slot in self.segments]
            table = torch.tensor(rows, dtype=torch.int32).reshape(-1, 3)
            cached = self._device_cache[device] = table.t().contiguous().to(device)
        return cached

    def slot_groups(self, device: torch.device) -> SlotGroups:
        """Per-slot padded layout of the LoRA rows (see ``SlotGroups``), built once per step."""
        cached = self._groups_cache.get(device)
        if cached is None:
            lo = min(slot for _, _, slot in self.segments)
            hi = max(slot for _, _, slot in self.segments)
            counts = [0] * (hi - lo + 1)
            rows: list[int] = []
            positions: list[tuple[int, int]] = []
            for start, end, slot in self.segments:
                for row in range(start, end):
                    rows.append(row)
                    positions.append((slot - lo, counts[slot - lo]))
                    counts[slot - lo] += 1
            width = max(counts)
            padded = [g * width + pos for g, pos in positions]
            dense = padded == list(range(len(rows))) and rows == list(range(rows[0], rows[0] + len(rows)))
            cached = self._groups_cache[device] = SlotGroups(
                lo,
                hi,
                width,
                torch.tensor(rows, device=device),
                torch.tensor(padded, device=device),
                rows[0],
                dense and len(padded) == len(counts) * width,
            )
        return cached

    def check_rows(self, rows: int) -> None:
        """Raises if a layer sees a different number of rows than the engine announced."""
        if self.num_tokens is not None and rows != self.num_tokens:
            raise RuntimeError(
                f"LoRA batch was set for {self.num_tokens} tokens but the layer got {rows} rows"
            )
