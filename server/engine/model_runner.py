"""Turns a scheduled batch into one packed forward pass and returns the logits to sample from.

The runner lays the step out once (``StepLayout``: which rows belong to which sequence, where their
K/V go), hands it to the attention backend's ``plan`` and the LoRA side's ``prepare_batch``, then
runs the HF model once over all rows. Both backends do their per-step work there, not per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.adapter_slots import AdapterSlots
from server.engine.sequence import Sequence
from server.model.attention import AttentionBackend, SeqSpan, StepLayout


@dataclass
class ModelRunner:
    model: torch.nn.Module
    attention: AttentionBackend  # owns the KV cache
    lora: AdapterSlots | None = None  # None: base-model serving only

    @property
    def device(self) -> torch.device:
        return self.attention.device

    @property
    def block_size(self) -> int:
        return self.attention.block_size

    def layout(self, seqs: list[Sequence]) -> tuple[list[int], list[int], StepLayout, list[int]]:
        """Packed token ids, positions, the attention layout and the rows whose logits are sampled."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        spans: list[SeqSpan] = []
        sample_rows: list[int] = []
        for seq in seqs:
            start, n = seq.num_computed_tokens, seq.num_new_tokens
            row = len(ids)
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            spans.append(SeqSpan(row, n, start + n, table))
            if seq.will_sample:
                sample_rows.append(row + n - 1)
        return ids, positions, StepLayout(spans, slots), sample_rows

    @staticmethod
    def prompt_logprob_rows(seqs: list[Sequence]) -> list[int]:
        """Rows whose logits score a prompt token (requests asking for prompt logprobs), in order."""
        rows, row = [], 0
        for seq in seqs:
            rows.extend(row + p - seq.num_computed_tokens for p in seq.prompt_logprob_positions())
            row += seq.num_new_tokens
        return rows

    @torch.inference_mode()
    def run(self, seqs: list[Sequence]) -> torch.Tensor:
        """Runs one step; returns float32 logits [num sampling seqs + num prompt-logprob rows, vocab]:
        first one row per sampling sequence in ``seqs`` order, then ``prompt_logprob_rows(seqs)``."""
        ids, positions, layout, sample_rows = self.layout(seqs)
        sample_rows += self.prompt_logprob_rows(seqs)
        self.attention.plan(layout)
        if self.lora is not None:
            self.lora.prepare_batch([s.lora_slot for s in seqs], [s.num_new_tokens for s in seqs])
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        position_ids = torch.tensor([positions], dtype=torch.long, device=self.device)
        # With only partial prefill chunks nothing is sampled, but K/V must still be written.
        keep = torch.tensor(sample_rows or [len(ids) - 1], dtype=torch.long, device=self.device)
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            attn_backend=self.attention,
            use_cache=False,
            logits_to_keep=keep,
        )
        return out.logits[0, : len(sample_rows)].float()
