"""A step's model inputs in persistent buffers: written on the host, moved to the device in one copy.

Every integer a forward reads (token ids, positions, KV slot mapping, sequence offsets and context
lengths, block tables, the rows whose logits are kept, and the LoRA segment table) lives in one
int32 buffer carved into fixed regions, sized once for ``max_num_seqs`` sequences and
``max_num_batched_tokens`` tokens. On CUDA the host side is pinned and the device side is copied
with one ``non_blocking`` copy per step, so preparing a step never waits for the device; the
device views keep their addresses, which is what lets a captured CUDA graph read each new step.
On the CPU both sides are the same tensor and the copy is skipped.

Host buffers are reused every step. That is safe because each step ends by fetching its sampled
ids (a sync), so the previous step's copy has completed before the next step writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from server.engine.sequence import Sequence
from server.model.attention import StepLayout, StepTensors


@dataclass(frozen=True)
class StepLimits:
    max_num_seqs: int
    max_num_tokens: int
    max_blocks_per_seq: int
    block_size: int
    padding_block: int  # padding rows write to this block; the block manager never hands it out


@dataclass(frozen=True)
class PreparedStep:
    """One step's inputs as the forward reads them (device views) and what the LoRA side needs."""

    input_ids: torch.Tensor  # [1, T] int32
    positions: torch.Tensor  # [1, T] int32
    logits_rows: torch.Tensor  # [num_sampled] int32 rows whose logits are computed
    num_sampled: int
    layout: StepLayout
    lora_slots: list[int]  # per sequence (padding rows: -1)
    lora_tokens: list[int]


class StepBuffers:
    """One int32 buffer (pinned on the host for CUDA) and its device twin, split into named regions."""

    def __init__(self, sizes: dict[str, tuple[int, ...]], device: torch.device) -> None:
        self.device = device
        total = sum(int(np.prod(shape)) for shape in sizes.values())
        on_cuda = device.type == "cuda"
        self.host = torch.zeros(total, dtype=torch.int32, pin_memory=on_cuda)
        self.dev = torch.zeros(total, dtype=torch.int32, device=device) if on_cuda else self.host
        self.offsets: dict[str, int] = {}
        self.shapes = dict(sizes)
        offset = 0
        for name, shape in sizes.items():
            self.offsets[name] = offset
            offset += int(np.prod(shape))
        self.np = self.host.numpy()

    def host_view(self, name: str) -> torch.Tensor:
        return self._view(self.host, name)

    def device_view(self, name: str) -> torch.Tensor:
        return self._view(self.dev, name)

    def np_view(self, name: str) -> np.ndarray:
        start = self.offsets[name]
        return self.np[start : start + int(np.prod(self.shapes[name]))].reshape(self.shapes[name])

    def _view(self, flat: torch.Tensor, name: str) -> torch.Tensor:
        start = self.offsets[name]
        return flat[start : start + int(np.prod(self.shapes[name]))].view(self.shapes[name])

    def upload(self, end: int) -> None:
        """The step's one host-to-device copy: every region up to flat offset ``end``."""
        if self.dev is not self.host:
            self.dev[:end].copy_(self.host[:end], non_blocking=True)


class StepInputs:
    """Fills ``StepBuffers`` from the scheduled sequences (optionally padded to a decode bucket)."""

    def __init__(self, limits: StepLimits, device: torch.device | str) -> None:
        self.limits = limits
        seqs, tokens = limits.max_num_seqs, max(limits.max_num_tokens, limits.max_num_seqs)
        self.buffers = StepBuffers(
            {
                "input_ids": (tokens,),
                "positions": (tokens,),
                "slot_mapping": (tokens,),
                "logits_rows": (tokens,),  # sampled rows, then any prompt-logprob rows
                "query_start": (seqs + 1,),
                "context_lens": (seqs,),
                "lora_segments": (3, seqs),
                "block_tables": (seqs, limits.max_blocks_per_seq),  # last: the copy covers used rows only
            },
            torch.device(device),
        )
        self._np = {name: self.buffers.np_view(name) for name in self.buffers.shapes}

    def lora_segment_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The [3, max_num_seqs] int32 region the LoRA side writes its segment table into (host, device)."""
        return self.buffers.host_view("lora_segments"), self.buffers.device_view("lora_segments")

    def prepare(
        self, seqs: list[Sequence], pad_to: int | None = None, extra_rows: list[int] = ()
    ) -> PreparedStep:
        """Writes the step's inputs on the host; ``upload`` then moves them. ``pad_to``: a decode step
        padded with dummy rows to that many sequences (they write and read only the padding block).
        ``extra_rows``: more rows whose logits are kept after the sampled ones (prompt logprobs)."""
        num_rows = pad_to or len(seqs)
        if num_rows > self.limits.max_num_seqs:
            raise ValueError(f"{num_rows} sequences in one step; the buffers hold {self.limits.max_num_seqs}")
        tokens, sampled, max_query, max_context = self._fill(seqs)
        if pad_to is not None:  # a decode step, even when it holds only padding (graph capture)
            self._pad(len(seqs), pad_to)
            tokens, sampled = pad_to, list(range(pad_to))
            max_query, max_context = 1, max(max_context, 1)
        keep = sampled + list(extra_rows) or [tokens - 1]  # chunks only: K/V still written, one row computed
        self._np["logits_rows"][: len(keep)] = keep
        dev = self.buffers.device_view
        layout = StepLayout(
            num_seqs=num_rows,
            num_tokens=tokens,
            max_query_len=max_query,
            max_context_len=max_context,
            block_size=self.limits.block_size,
            device=self._tensors(dev, num_rows, tokens),
            host=self._tensors(self.buffers.host_view, num_rows, tokens),
            static=pad_to is not None,
        )
        padding = (pad_to or len(seqs)) - len(seqs)
        return PreparedStep(
            input_ids=dev("input_ids")[:tokens].view(1, tokens),
            positions=dev("positions")[:tokens].view(1, tokens),
            logits_rows=dev("logits_rows")[: len(keep)],
            num_sampled=len(sampled),
            layout=layout,
            lora_slots=[s.lora_slot for s in seqs] + [-1] * padding,
            lora_tokens=[s.num_new_tokens for s in seqs] + [1] * padding,
        )

    def upload(self, num_rows: int) -> None:
        """Moves everything written for a step of ``num_rows`` sequences to the device, in one copy."""
        end = self.buffers.offsets["block_tables"] + num_rows * self.limits.max_blocks_per_seq
        self.buffers.upload(end)

    def _tensors(self, view, num_rows: int, tokens: int) -> StepTensors:
        return StepTensors(
            query_start=view("query_start")[: num_rows + 1],
            context_lens=view("context_lens")[:num_rows],
            block_tables=view("block_tables")[:num_rows],
            slot_mapping=view("slot_mapping")[:tokens],
        )

    def _fill(self, seqs: list[Sequence]) -> tuple[int, list[int], int, int]:
        """Host writes for the real sequences; returns (tokens, sampled rows, max query, max context)."""
        bs, width = self.limits.block_size, self.limits.max_blocks_per_seq
        npv = self._np
        ids, positions, slots = npv["input_ids"], npv["positions"], npv["slot_mapping"]
        query_start, context, tables = npv["query_start"], npv["context_lens"], npv["block_tables"]
        row, sampled, max_query, max_context = 0, [], 0, 0
        query_start[0] = 0
        for i, seq in enumerate(seqs):
            start, n = seq.num_computed_tokens, seq.num_new_tokens
            end, table = start + n, seq.block_table
            if len(table) > width:
                raise ValueError(f"sequence {seq.request_id} holds {len(table)} KV blocks; at most {width}")
            tables[i, : len(table)] = table
            if n == 1:  # decode: plain scalar writes beat numpy's per-call overhead
                ids[row] = seq.token_ids[start]
                positions[row] = start
                slots[row] = table[start // bs] * bs + start % bs
            else:
                pos = np.arange(start, end)
                ids[row : row + n] = seq.token_ids[start:end]
                positions[row : row + n] = pos
                slots[row : row + n] = tables[i, pos // bs] * bs + pos % bs
            row += n
            query_start[i + 1] = row
            context[i] = end
            if seq.will_sample:
                sampled.append(row - 1)
            max_query, max_context = max(max_query, n), max(max_context, end)
        return row, sampled, max_query, max_context

    def _pad(self, first: int, pad_to: int) -> None:
        """Dummy decode rows ``first..pad_to-1``: token 0 at position 0 of the padding block."""
        npv, block = self._np, self.limits.padding_block
        npv["input_ids"][first:pad_to] = 0
        npv["positions"][first:pad_to] = 0
        npv["slot_mapping"][first:pad_to] = block * self.limits.block_size
        npv["query_start"][first + 1 : pad_to + 1] = np.arange(first + 1, pad_to + 1)
        npv["context_lens"][first:pad_to] = 1
        npv["block_tables"][first:pad_to, 0] = block
