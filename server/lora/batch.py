"""Per-step LoRA batch metadata: which rows of the packed batch use which device slot.

One ``LoRABatch`` is owned by the adapter manager (through the injected-model handle) and shared by
every LoRA-wrapped linear of that model; the engine refreshes it once per step before the forward.
Consecutive sequences on the same slot are merged into one segment (SGMV); base-model rows (slot -1)
get no segment at all, so they cost nothing in the LoRA op.

The ops read the rows grouped by slot (``SlotRows``): one jagged group per slot of the live range,
whatever the rows per slot (prefill chunks of any length, single decode rows, base rows between).
It is built once per step, on first use, and shared by every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SlotRows:
    """The LoRA rows of a step in slot order: group ``g`` holds the rows of slot ``lo + g``.

    ``offsets[g]`` is the end of group g in that order (int32, for ``grouped_mm``; a slot of the range
    with no rows has an empty group). When the engine's batch already lists the LoRA rows by slot,
    back to back (it sorts sequences by slot), ``rows`` is None and they are ``[first, last)`` as they
    are: no gather. Otherwise ``rows`` [M] names the batch row of each grouped row.
    """

    lo: int
    hi: int
    offsets: torch.Tensor  # [hi - lo + 1] int32
    row_slot: torch.Tensor  # [M] int64: the slot of each grouped row
    batch_rows: torch.Tensor  # [M] int64: the batch row of each grouped row
    rows: torch.Tensor | None  # ``batch_rows`` when a gather is needed; None: rows [first, last) in place
    first: int
    last: int
    live_slots: tuple[int, ...]  # the slots with rows this step, ascending

    @property
    def num_rows(self) -> int:
        return int(self.row_slot.shape[0])

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """The grouped rows of ``x`` [N, d] -> [M, d] (a view when they are in place)."""
        return x[self.first : self.last] if self.rows is None else x.index_select(0, self.rows)

    def add_into(self, y: torch.Tensor, delta: torch.Tensor) -> None:
        """``y[row] += delta[i]`` for grouped row i (``y`` may be a column slice)."""
        if self.rows is None:
            y[self.first : self.last].add_(delta)
        else:
            y.index_add_(0, self.rows, delta)


class LoRABatch:
    """Segments ``(start, end, slot)`` over the flattened token rows of the current forward."""

    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self.num_tokens: int | None = None  # None: no batch set, LoRA layers act as the base model
        self.segments: list[tuple[int, int, int]] = []
        self._device_cache: dict[torch.device, torch.Tensor] = {}
        self._rows_cache: dict[torch.device, SlotRows] = {}

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
        self._rows_cache = {}

    def clear(self) -> None:
        """Back to "no batch": every row runs the base model."""
        self.num_tokens = None
        self.segments = []
        self._device_cache = {}
        self._rows_cache = {}

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

    def slot_rows(self, device: torch.device) -> SlotRows:
        """The LoRA rows grouped by slot (see ``SlotRows``), built once per step; needs a segment."""
        cached = self._rows_cache.get(device)
        if cached is None:
            cached = self._rows_cache[device] = self._group_rows(device)
        return cached

    def _group_rows(self, device: torch.device) -> SlotRows:
        by_slot: dict[int, list[tuple[int, int]]] = {}
        for start, end, slot in self.segments:
            by_slot.setdefault(slot, []).append((start, end))
        live = tuple(sorted(by_slot))
        lo, hi = live[0], live[-1]
        ordered = [span for slot in live for span in by_slot[slot]]
        in_place = all(prev[1] == nxt[0] for prev, nxt in zip(ordered, ordered[1:], strict=False))
        ends, row_slot, total = [], [], 0
        for slot in range(lo, hi + 1):
            for start, end in by_slot.get(slot, ()):
                total += end - start
                row_slot += [slot] * (end - start)
            ends.append(total)
        if in_place:
            batch_rows = torch.arange(ordered[0][0], ordered[-1][1], dtype=torch.long, device=device)
        else:
            batch_rows = torch.tensor(
                [r for s, e in ordered for r in range(s, e)], dtype=torch.long, device=device
            )
        return SlotRows(
            lo,
            hi,
            torch.tensor(ends, dtype=torch.int32, device=device),
            torch.tensor(row_slot, dtype=torch.long, device=device),
            batch_rows,
            None if in_place else batch_rows,
            ordered[0][0],
            ordered[-1][1],
            live,
        )

    def check_rows(self, rows: int) -> None:
        """Raises if a layer sees a different number of rows than the engine announced."""
        if self.num_tokens is not None and rows != self.num_tokens:
            raise RuntimeError(
                f"LoRA batch was set for {self.num_tokens} tokens but the layer got {rows} rows"
            )
