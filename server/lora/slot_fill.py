"""Copies packed adapters into device slots: on the engine thread when a request needs it now, or
ahead of time on a worker thread for a request still waiting (``submit``).

Each fill packs the adapter's whole slot row on the host (``SlotRows.pack``: padding, transposes,
scale folding) and lands it in the slot with one copy. On a CUDA device the row is a reused pinned
host buffer and the copy runs asynchronously on a side stream, so it overlaps the engine's compute
on the default stream; the worker waits for its copy before the fill counts as done, so the engine
reads a slot only after its bytes have landed. On the CPU the device memory is host memory: the row
is packed straight into the slot (no second copy).
"""

from __future__ import annotations

import queue
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from server.lora.adapter import LoRAAdapter
from server.lora.slot_rows import SlotRows, TargetFacts


class SlotFiller:
    def __init__(self, rows: SlotRows) -> None:
        self.rows = rows
        self.cuda = rows.device.type == "cuda"
        self._stream = torch.cuda.Stream(rows.device) if self.cuda else None
        self._staging: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()  # pinned rows, reused
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-slot-fill")

    def fill_now(self, slot: int, adapter: LoRAAdapter) -> list[TargetFacts]:
        """Writes ``adapter`` into ``slot`` before returning (engine thread)."""
        stream = torch.cuda.current_stream(self.rows.device) if self.cuda else None
        return self._fill(slot, adapter, stream)

    def submit(self, slot: int, adapter: LoRAAdapter) -> Future[list[TargetFacts]]:
        """Writes ``adapter`` into ``slot`` on the worker; the slot must not be read until it is done."""
        return self._pool.submit(self._fill_in_worker, slot, adapter)

    def _fill_in_worker(self, slot: int, adapter: LoRAAdapter) -> list[TargetFacts]:
        with torch.inference_mode():  # thread-local: the slots may be inference tensors
            return self._fill(slot, adapter, self._stream)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _fill(self, slot: int, adapter: LoRAAdapter, stream) -> list[TargetFacts]:
        if not self.cuda:
            return self.rows.pack(adapter, self.rows.storage[slot], slot)
        try:
            row = self._staging.get_nowait()
        except queue.Empty:
            row = self.rows.new_row(pin_memory=True)
        try:
            facts = self.rows.pack(adapter, row)
        except Exception:
            self._staging.put(row)  # no copy was issued from it
            raise
        with torch.cuda.stream(stream):
            self.rows.storage[slot].copy_(row, non_blocking=True)
        stream.synchronize()  # the bytes have landed: any stream may read the slot, the row is free
        self._staging.put(row)
        return facts
