"""Turns a scheduled batch into one packed forward pass and returns the logits to sample from."""

from __future__ import annotations

from collections.abc import Callable

import torch

from server.engine.sequence import Sequence
from server.model.attention import AttentionMetadata, PrefillChunk
from server.model.loader import ModelGeometry

LoRABatchHook = Callable[[list[int], list[int]], None]


class ModelRunner:
    """Owns the paged KV cache and runs the model once per step on the packed batch."""

    def __init__(
        self,
        model: torch.nn.Module,
        geometry: ModelGeometry,
        num_blocks: int,
        block_size: int,
        device: str,
        dtype: torch.dtype,
        lora_hook: LoRABatchHook | None = None,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.device = torch.device(device)
        self.lora_hook = lora_hook
        shape = (2, num_blocks, block_size, geometry.num_kv_heads, geometry.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(geometry.num_layers)]

    @staticmethod
    def kv_bytes_per_block(geometry: ModelGeometry, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        return 2 * geometry.num_layers * block_size * geometry.num_kv_heads * geometry.head_dim * elem

    def prepare(
        self, seqs: list[Sequence]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Packed ids, positions, attention metadata and the rows whose logits are sampled."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        prefills: list[PrefillChunk] = []
        decode_rows: list[int] = []
        decode_ctx: list[int] = []
        decode_tables: list[list[int]] = []
        sample_rows: list[int] = []
        for seq in seqs:
            start, n = seq.num_computed_tokens, seq.num_new_tokens
            row = len(ids)
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            if n == 1:
                decode_rows.append(row)
                decode_ctx.append(start + 1)
                decode_tables.append(table)
            else:
                prefills.append(
                    PrefillChunk(
                        row, row + n, start + n, torch.tensor(table, dtype=torch.long, device=self.device)
                    )
                )
            if seq.will_sample:
                sample_rows.append(row + n - 1)
        meta = AttentionMetadata(
            kv_caches=self.kv_caches,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            prefills=prefills,
            decode_token_idx=None,
            decode_block_tables=None,
            decode_mask=None,
        )
        if decode_rows:
            self._prepare_decode(meta, decode_rows, decode_ctx, decode_tables)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        pos = torch.tensor([positions], dtype=torch.long, device=self.device)
        return input_ids, pos, meta, sample_rows

    def _prepare_decode(self, meta: AttentionMetadata, rows, ctx_lens, tables) -> None:
        max_blocks = max(len(t) for t in tables)
        padded = [t + [0] * (max_blocks - len(t)) for t in tables]
        ctx = torch.tensor(ctx_lens, dtype=torch.long, device=self.device)
        key_pos = torch.arange(max_blocks * self.block_size, device=self.device)
        meta.decode_token_idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        meta.decode_block_tables = torch.tensor(padded, dtype=torch.long, device=self.device)
        meta.decode_mask = (key_pos[None, :] < ctx[:, None])[:, None, None, :]
        meta.decode_positions = ctx - 1

    @torch.inference_mode()
    def run(self, seqs: list[Sequence]) -> torch.Tensor:
        """Runs one step; returns logits [num sampling seqs, vocab] in ``seqs`` order (float32)."""
        input_ids, positions, meta, sample_rows = self.prepare(seqs)
        if self.lora_hook is not None:
            self.lora_hook([s.lora_slot for s in seqs], [s.num_new_tokens for s in seqs])
        # With only partial prefill chunks nothing is sampled, but K/V must still be written.
        keep = torch.tensor(sample_rows or [input_ids.shape[1] - 1], dtype=torch.long, device=self.device)
        out = self.model(
            input_ids=input_ids, position_ids=positions, attn_meta=meta, use_cache=False, logits_to_keep=keep
        )
        return out.logits[0, : len(sample_rows)].float()
