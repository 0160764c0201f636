"""Copies packed adapters into device pages: on the engine thread when a request needs it now, or
ahead of time on a worker thread for a request still waiting (``submit``).

Each fill packs the adapter's page rows and vector row on the host (``SlotRows``: rank blocking,
transposes, scale folding). On a CUDA device the rows are one contiguous reused pinned host buffer,
copied with one host-to-device copy and scattered to the adapter's pages on the device, all
asynchronously on a side stream, so they overlap the engine's compute on the default stream; the
worker waits for its copies before the fill counts as done, so the engine reads a slot only after
its bytes have landed. On the CPU the device memory is
host memory: the adapter is packed straight into its pages (no second copy).
"""

from __future__ import annotations

import queue
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from server.lora.adapter import LoRAAdapter
from server.lora.slot_rows import SlotRows, Staging, TargetFacts
from server.lora.slot_table import Residency


class SlotFiller:
    def __init__(self, rows: SlotRows) -> None:
        self.rows = rows
        self.cuda = rows.device.type == "cuda"
        self._stream = torch.cuda.Stream(rows.device) if self.cuda else None
        self._staging: queue.SimpleQueue[Staging] = queue.SimpleQueue()  # pinned rows, reused
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-slot-fill")

    def fill_now(self, where: Residency, adapter: LoRAAdapter) -> list[TargetFacts]:
        """Writes ``adapter`` into its slot and pages before returning (engine thread)."""
        stream = torch.cuda.current_stream(self.rows.device) if self.cuda else None
        return self._fill(where, adapter, stream)

    def submit(self, where: Residency, adapter: LoRAAdapter) -> Future[list[TargetFacts]]:
        """Writes ``adapter`` on the worker; its slot and pages must not be read until it is done."""
        return self._pool.submit(self._fill_in_worker, where, adapter)

    def _fill_in_worker(self, where: Residency, adapter: LoRAAdapter) -> list[TargetFacts]:
        with torch.inference_mode():  # thread-local: the slots may be inference tensors
            return self._fill(where, adapter, self._stream)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _fill(self, where: Residency, adapter: LoRAAdapter, stream) -> list[TargetFacts]:
        if not self.cuda:
            return self.rows.fill_in_place(adapter, where.slot, where.pages)
        try:
            staging = self._staging.get_nowait()
        except queue.Empty:
            staging = self.rows.new_staging(pin_memory=True)
        try:
            facts = self.rows.pack_staged(adapter, where.slot, where.pages, staging)
        except Exception:
            self._staging.put(staging)  # no copy was issued from it
            raise
        with torch.cuda.stream(stream):
            self.rows.copy_in(where.slot, where.pages, staging)
        stream.synchronize()  # the bytes have landed: any stream may read the slot, the rows are free
        self._staging.put(staging)
        return facts
