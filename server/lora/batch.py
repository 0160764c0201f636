"""Per-step LoRA batch metadata: which rows of the packed batch use which device slot.

One ``LoRABatch`` is owned by the adapter manager (through the injected-model handle) and shared by
every LoRA-wrapped linear of that model; the engine refreshes it once per step before the forward.
Consecutive sequences on the same slot are merged into one segment (SGMV); base-model rows (slot -1)
get no segment at all, so they cost nothing in the LoRA op.

Two views of the same segments, each built once per step on first use and shared by every layer:
the ``[3, capacity]`` segment table the Triton kernels read (in the model runner's step buffers when
bound, so a captured graph reads the next step's), and ``SlotRows``, the rows grouped by slot that the
torch and native CPU ops read: one jagged group per slot of the live range, whatever the rows per
slot (prefill chunks of any length, single decode rows, base rows between).
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


class StaticRows:
    """Every row's slot (-1: a base row) of a static (padded decode) step, in persistent tensors: a
    compiled decode graph reads these same tensors every step, whatever the step's slots are.
    Sized by the first (largest) bucket, which is captured first."""

    def __init__(self) -> None:
        self.rows = torch.zeros(0, dtype=torch.long)
        self.slots = torch.zeros(0, dtype=torch.long)

    def fill(self, seq_slots: Sequence[int]) -> None:
        n = len(seq_slots)
        if n > self.slots.numel():
            self.rows = torch.arange(n, dtype=torch.long)
            self.slots = torch.full((n,), -1, dtype=torch.long)
        self.slots[:n] = torch.as_tensor(list(seq_slots), dtype=torch.long)


# Decode steps split segments at this many rows: the Triton kernel then runs one fixed row block per
# segment, so a padded (graph) step and an eager one launch identical tiles and agree bit for bit.
DECODE_SEGMENT_ROWS = 16


class LoRABatch:
    """Segments ``(start, end, slot)`` over the flattened token rows of the current forward.

    The kernels read the segments as a ``[3, capacity]`` int32 table (starts, lengths, slots; unused
    columns have length 0). With ``bind`` the table lives in the model runner's step buffers, which
    the runner copies to the device once per step; unbound (tests, tools) the batch keeps its own.
    """

    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self.num_tokens: int | None = None  # None: no batch set, LoRA layers act as the base model
        self._set_segments([])
        self.static = False  # a padded decode step: launches depend on its row count only
        self.launch_segments = 0  # segment programs a kernel launches (>= len(segments))
        self.segment_rows: int | None = None  # decode: the fixed row block per segment
        self._bound: tuple[torch.Tensor, torch.Tensor] | None = None
        self._device_cache: dict[torch.device, torch.Tensor] = {}
        self._rows_cache: dict[torch.device, SlotRows] = {}
        self.static_rows = StaticRows()

    def bind(self, host: torch.Tensor, device: torch.Tensor) -> None:
        """Keeps the segment table in ``host`` (written by ``set``), read by kernels from ``device``."""
        self._bound = (host, device)

    def set(self, seq_slots: Sequence[int], seq_num_tokens: Sequence[int], static: bool = False) -> None:
        """Sequence i occupies the next ``seq_num_tokens[i]`` rows and uses slot ``seq_slots[i]`` (-1 = none).
        ``static``: a decode step padded to ``len(seq_slots)`` rows for a captured graph."""
        if len(seq_slots) != len(seq_num_tokens):
            raise ValueError(f"{len(seq_slots)} slots for {len(seq_num_tokens)} sequences")
        decode = len(seq_num_tokens) > 0 and all(int(n) == 1 for n in seq_num_tokens)
        if static and not decode:
            raise ValueError("a static LoRA batch must be a decode step (one token per sequence)")
        limit = DECODE_SEGMENT_ROWS if decode else None
        segments: list[tuple[int, int, int]] = []
        row = 0
        for slot, n in zip(seq_slots, seq_num_tokens, strict=True):
            slot, n = int(slot), int(n)
            if n < 0 or not -1 <= slot < self.max_loras:
                raise ValueError(f"invalid sequence: slot {slot} (max_loras={self.max_loras}), {n} tokens")
            if slot >= 0 and n > 0:
                last = segments[-1] if segments else None
                if (
                    last
                    and last[2] == slot
                    and last[1] == row
                    and (limit is None or row + n - last[0] <= limit)
                ):
                    segments[-1] = (last[0], row + n, slot)
                else:
                    segments.append((row, row + n, slot))
            row += n
        self.num_tokens = row
        self._set_segments(segments)
        self.static = static
        self.launch_segments = len(seq_slots) if static else len(segments)
        self.segment_rows = limit
        self._device_cache = {}
        self._rows_cache = {}
        if self._bound is not None:
            self._write_table(self._bound[0])
        if static:
            self.static_rows.fill(seq_slots)

    def clear(self) -> None:
        """Back to "no batch": every row runs the base model."""
        self.num_tokens = None
        self._set_segments([])
        self.static = False
        self.launch_segments = 0
        self.segment_rows = None
        self._device_cache = {}
        self._rows_cache = {}

    @property
    def max_segment_len(self) -> int:
        if self.segment_rows is not None:
            return self.segment_rows
        return max((end - start for start, end, _ in self.segments), default=0)

    def segment_table(self, device: torch.device) -> torch.Tensor:
        """``[3, capacity]`` int32 on ``device`` for the kernels: rows ``starts``, ``lens`` and ``slots``
        of the segments (columns past the live ones have length 0). Starts and lengths rather than an
        indptr because base-model rows leave gaps between segments."""
        if self._bound is not None:
            return self._bound[1]
        cached = self._device_cache.get(device)
        if cached is None:
            table = torch.zeros(3, max(self.launch_segments, 1), dtype=torch.int32)
            self._write_table(table)
            cached = self._device_cache[device] = table.to(device)
        return cached

    def _write_table(self, table: torch.Tensor) -> None:
        capacity = table.shape[1]
        if self.launch_segments > capacity:
            raise ValueError(f"{self.launch_segments} LoRA segments; the step buffers hold {capacity}")
        columns = [[s, e - s, slot] for s, e, slot in self.segments]
        if columns:
            table[:, : len(columns)] = torch.tensor(columns, dtype=torch.int32).t()
        table[1, len(columns) : self.launch_segments] = 0  # programs past the live segments add nothing

    def _set_segments(self, segments: list[tuple[int, int, int]]) -> None:
        """The step's segments, and what every layer asks of them, computed once here rather than
        per layer: ``live_slots`` (the slots with rows, ascending) and ``live_mask`` (the same as a
        bit mask, ANDed with a target's ``SlotWeights`` masks to skip targets no live slot uses)."""
        self.segments = segments
        self.live_slots: tuple[int, ...] = tuple(sorted({slot for _, _, slot in segments}))
        self.live_mask = sum(1 << slot for slot in self.live_slots)

    def slot_rows(self, device: torch.device) -> SlotRows:
        """The LoRA rows grouped by slot (see ``SlotRows``), built once per step; needs a segment."""
        cached = self._rows_cache.get(device)
        if cached is None:
            cached = self._rows_cache[device] = group_rows(self.segments, device)
        return cached

    def check_rows(self, rows: int) -> None:
        """Raises if a layer sees a different number of rows than the engine announced."""
        if self.num_tokens is not None and rows != self.num_tokens:
            raise RuntimeError(
                f"LoRA batch was set for {self.num_tokens} tokens but the layer got {rows} rows"
            )


def group_rows(segments: list[tuple[int, int, int]], device: torch.device) -> SlotRows:
    """The rows of ``segments`` grouped by slot (see ``SlotRows``); needs a segment."""
    by_slot: dict[int, list[tuple[int, int]]] = {}
    for start, end, slot in segments:
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
