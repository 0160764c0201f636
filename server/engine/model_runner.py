"""Turns a scheduled batch into one packed forward pass and returns the logits to sample from.

Per step: the inputs are written into persistent host buffers (``StepInputs``), the attention
backend plans the step (``plan``) and the LoRA side lays out its segments (``prepare_batch``, into
the same buffers), then one non-blocking copy moves everything to the device and the model runs
once over all rows. Nothing in that path reads a value back from the device; the only sync of a
step is the sampler fetching the sampled ids.

Decode steps (one new token per sequence) are padded to a batch-size bucket and run through
``DecodeGraphs`` when one is configured: CUDA graphs on CUDA, or eager replay of the same padded
shapes with ``--enforce-eager``. Other steps (prefill chunks, batches larger than the largest
bucket, or LoRA states a graph cannot replay) run eagerly at their own size.
"""

from __future__ import annotations

import logging

import torch

from server.engine.adapter_slots import AdapterSlots
from server.engine.decode_graphs import DecodeGraphs
from server.engine.sequence import Sequence
from server.engine.step_inputs import PreparedStep, StepInputs, StepLimits
from server.model.attention import AttentionBackend
from server.model.lean_forward import lean_forward_for

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        attention: AttentionBackend,  # owns the KV cache
        lora: AdapterSlots | None = None,  # None: base-model serving only
        *,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_model_len: int = 2048,
        graphs: DecodeGraphs | None = None,
    ) -> None:
        self.model = model
        self.attention = attention
        self.lora = lora
        bs = attention.block_size
        self.inputs = StepInputs(
            StepLimits(
                max_num_seqs, max_num_batched_tokens, -(-max_model_len // bs), bs, attention.padding_block
            ),
            attention.device,
        )
        if lora is not None:
            lora.bind_step_buffers(*self.inputs.lora_segment_views())
        self.graphs = graphs
        self.lean = lean_forward_for(model)  # Llama-shaped decoders on CPU; else the HF forward
        compile_forward = getattr(graphs.strategy, "compile_forward", None) if graphs is not None else None
        self._decode_forward = (
            compile_forward(self._forward) if compile_forward is not None else self._forward
        )
        if (
            graphs is not None
            and graphs.strategy.needs_static_backends
            and not attention.supports_cuda_graphs
        ):
            graphs.disable(f"attention backend '{attention.name}' cannot be captured")

    @property
    def device(self) -> torch.device:
        return self.attention.device

    @property
    def block_size(self) -> int:
        return self.attention.block_size

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
        prompt_rows = self.prompt_logprob_rows(seqs)
        bucket = None if prompt_rows else self._decode_bucket(seqs)
        step = self._prepare(seqs, bucket, prompt_rows)
        if bucket is not None:
            return self.graphs.run(bucket)[: len(seqs)].float()
        logits = self._forward(step.input_ids, step.positions, step.logits_rows)
        return logits[: step.num_sampled + len(prompt_rows)].float()

    @torch.inference_mode()
    def capture_decode_graphs(self) -> None:
        """Records (or, for eager replay, registers) the decode forward of every bucket. Call once,
        after the KV cache exists and before serving. Under inference mode, like the steps that
        replay them (a compiled graph is specialized to it)."""
        graphs = self.graphs
        if graphs is None or not graphs.active:
            return
        if graphs.strategy.needs_static_backends and self.lora is not None and not self.lora.graph_safe():
            graphs.disable("the LoRA backend's launches cannot be captured (use lora_backend 'triton')")
            return
        graphs.capture_all(self._prepare_dummy_decode, self._bucket_forward)

    def _decode_bucket(self, seqs: list[Sequence]) -> int | None:
        """The bucket of a pure decode step (every sequence adds one token and samples it: a replayed
        bucket returns one logits row per sequence), else None."""
        graphs = self.graphs
        if (
            graphs is None
            or not graphs.active
            or any(s.num_new_tokens != 1 or not s.will_sample for s in seqs)
        ):
            return None
        if graphs.strategy.needs_static_backends and self.lora is not None and not self.lora.graph_safe():
            return None
        return graphs.bucket_for(len(seqs))

    def _prepare(self, seqs: list[Sequence], bucket: int | None, extra_rows: list[int]) -> PreparedStep:
        step = self.inputs.prepare(seqs, pad_to=bucket, extra_rows=extra_rows)
        self.attention.plan(step.layout)
        if self.lora is not None:
            self.lora.prepare_batch(step.lora_slots, step.lora_tokens, static=bucket is not None)
        self.inputs.upload(step.layout.num_seqs)
        return step

    def _prepare_dummy_decode(self, bucket: int) -> None:
        """A decode step of ``bucket`` padding rows; LoRA rows on slot 0 so the LoRA kernels are part
        of the capture (their segment table, refilled each step, decides what they add)."""
        step = self.inputs.prepare([], pad_to=bucket)
        self.attention.plan(step.layout)
        if self.lora is not None:
            self.lora.prepare_batch([0] * bucket, [1] * bucket, static=True)
        self.inputs.upload(bucket)

    def _bucket_forward(self, bucket: int) -> torch.Tensor:
        views = self.inputs.buffers.device_view
        ids = views("input_ids")[:bucket].view(1, bucket)
        positions = views("positions")[:bucket].view(1, bucket)
        return self._decode_forward(ids, positions, 0)  # logits_to_keep=0: every row

    def _forward(self, input_ids, position_ids, keep) -> torch.Tensor:
        """The model over one packed batch (callers run under inference mode)."""
        if self.lean is not None:
            return self.lean(input_ids, position_ids, self.attention, keep)
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            attn_backend=self.attention,
            use_cache=False,
            logits_to_keep=keep,
        )
        return out.logits[0]
