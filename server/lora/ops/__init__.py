"""The mixed-batch LoRA op behind one interface, with one implementation per platform.

``add_lora`` is what every LoRA-wrapped linear calls after its base matmul. ``torch`` is the
reference (correct everywhere, fast on CPU); ``triton`` runs SGMV shrink/expand kernels (CUDA, or the
Triton interpreter with ``TRITON_INTERPRET=1`` for tests). Backends are picked once, at injection.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch

from server.lora.batch import LoRABatch

BACKENDS = ("torch", "triton")


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: torch.Tensor,
    lora_b_stacked: torch.Tensor,
    batch: LoRABatch,
    *,
    ranks: Sequence[int] | None = None,
    backend: str = "torch",
) -> None:
    """Adds each segment's own low-rank delta to ``y`` in place (SGMV, Punica-style).

    Semantics::

        for (start, end, slot) in batch.segments:          # slot >= 0; base rows have no segment
            y[start:end] += (x[start:end] @ A[slot]) @ B[slot]      # A[slot] = A_peft.T, B[slot] = B_peft.T

    Shapes: ``y`` [N, out], ``x`` [N, in], ``A = lora_a_stacked`` [max_loras, in, max_rank],
    ``B = lora_b_stacked`` [max_loras, max_rank, out]; a slot's unused rank columns/rows are zero, so
    adapters of different ranks share the buffers. Scales (and DoRA's rescale) are pre-folded into B.
    ``ranks[slot]`` (optional) is the live rank of each slot: the torch backend slices to it, 0 skips.
    """
    if not batch.segments:
        return
    if backend == "torch":
        from server.lora.ops.sgmv_torch import sgmv_torch

        sgmv_torch(y, x, lora_a_stacked, lora_b_stacked, batch, ranks)
    elif backend == "triton":
        from server.lora.ops.sgmv_triton import sgmv_triton

        sgmv_triton(y, x, lora_a_stacked, lora_b_stacked, batch)
    else:
        raise ValueError(f"unknown LoRA backend {backend!r}; expected one of {BACKENDS}")


def triton_available(device: torch.device | str) -> bool:
    """Triton runs on CUDA devices, or anywhere under its interpreter (``TRITON_INTERPRET=1``)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return True
    return torch.device(device).type == "cuda"


def resolve_backend(requested: str, device: torch.device | str) -> str:
    """``Settings.lora_backend`` -> concrete backend: 'auto' is triton on CUDA when importable, else torch."""
    if requested == "auto":
        return "triton" if torch.device(device).type == "cuda" and triton_available(device) else "torch"
    if requested == "triton" and not triton_available(device):
        raise ValueError(
            f"lora_backend='triton' needs triton and a CUDA device (or TRITON_INTERPRET=1), got {device}"
        )
    if requested not in BACKENDS:
        raise ValueError(f"unknown LoRA backend {requested!r}; expected 'auto' or one of {BACKENDS}")
    return requested
