"""The mixed-batch LoRA compute path as one object per process (like vLLM's punica wrapper).

A backend owns the step's batch metadata (``LoRABatch``: which rows use which slot), built once per
step by ``plan`` and shared by every LoRA layer, and the shrink/expand op. Every wrapped linear calls
``apply(y, x, slot_weights)`` after its base matmul. ``torch`` is the reference (correct everywhere, fast
on CPU); ``triton`` runs SGMV kernels (CUDA, or the Triton interpreter with ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.lora.batch import LoRABatch
from server.lora.slot_weights import SlotWeights
from server.triton_support import triton_unavailable


class LoRABackend:
    """``plan`` once per step, ``apply`` per layer; subclasses provide ``sgmv``."""

    name = "abstract"
    # Whether a static (padded decode) batch runs as fixed launches reading only the segment table,
    # so a CUDA graph can replay it (the DoRA and lora_bias passes never are: they loop on the host).
    capturable = False

    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self.batch = LoRABatch(max_loras)

    def plan(self, seq_slots: Sequence[int], seq_num_tokens: Sequence[int], static: bool = False) -> None:
        """Sequence i occupies the next ``seq_num_tokens[i]`` rows and uses slot ``seq_slots[i]`` (-1: none);
        ``static``: a decode step padded to a graph bucket (see ``LoRABatch.set``)."""
        self.batch.set(seq_slots, seq_num_tokens, static)

    def clear(self) -> None:
        """No batch: every row runs the base model (e.g. a plain forward outside the engine)."""
        self.batch.clear()

    def apply(self, y: torch.Tensor, x: torch.Tensor, weights: SlotWeights) -> None:
        """Adds each row's adapter delta to ``y`` [N, out] in place, from ``x`` [N, in].

        Semantics, per segment ``(start, end, slot)`` of the batch (base rows have none)::

            y[start:end] = dora_scale[slot] * y[start:end] + dora_shift[slot]      # DoRA slots only
            y[start:end] += (x[start:end] @ a[slot]) @ b[slot] + bias[slot]
        """
        batch = self.batch
        batch.check_rows(x.shape[0])
        if any(weights.is_dora):
            for start, end, slot in batch.segments:
                if weights.is_dora[slot]:  # y = g * (W x) + b0  ==  g * y + (1 - g) * b0
                    y[start:end].mul_(weights.dora_scale[slot]).add_(weights.dora_shift[slot])
        self.sgmv(y, x, weights.a, weights.b, weights.rank)
        if any(weights.has_bias):
            for start, end, slot in batch.segments:
                if weights.has_bias[slot]:
                    y[start:end].add_(weights.bias[slot])

    def sgmv(
        self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ranks: Sequence[int]
    ) -> None:
        """``y[s:e] += (x[s:e] @ a[slot]) @ b[slot]`` per segment; ``ranks[slot]`` is each slot's
        live rank (columns beyond it are zero). Shapes: ``y`` [N, out], ``x`` [N, in],
        ``a`` [max_loras, in, max_rank], ``b`` [max_loras, max_rank, out]."""
        raise NotImplementedError


class TorchLoRABackend(LoRABackend):
    name = "torch"

    def sgmv(self, y, x, a, b, ranks) -> None:
        from server.lora.ops.sgmv_torch import sgmv_torch

        sgmv_torch(y, x, a, b, self.batch, ranks)


class TritonLoRABackend(LoRABackend):
    name = "triton"
    capturable = True

    def sgmv(self, y, x, a, b, ranks) -> None:
        from server.lora.ops.sgmv_triton import sgmv_triton

        sgmv_triton(y, x, a, b, self.batch)


BACKENDS: dict[str, type[LoRABackend]] = {"torch": TorchLoRABackend, "triton": TritonLoRABackend}


def triton_available(device: torch.device | str) -> bool:
    """Triton runs on CUDA devices, or anywhere under its interpreter (``TRITON_INTERPRET=1``)."""
    return triton_unavailable(device) is None


def make_lora_backend(requested: str, device: torch.device | str, max_loras: int) -> LoRABackend:
    """``Settings.lora_backend`` -> a backend: 'auto' is triton on CUDA when importable, else torch."""
    name = requested
    if requested == "auto":
        name = "triton" if torch.device(device).type == "cuda" and triton_available(device) else "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown LoRA backend {requested!r}; expected 'auto' or one of {sorted(BACKENDS)}")
    if name == "triton" and not triton_available(device):
        raise ValueError(
            f"lora_backend='triton' needs triton and a CUDA device (or TRITON_INTERPRET=1), got {device}"
        )
    return BACKENDS[name](max_loras)
