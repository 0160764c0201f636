"""Greedy token choice: the index of each row's largest logit, through a native kernel on CPU.

``torch.argmax(dim=-1)`` on CPU runs a scalar loop on one thread: ~0.3 ms for a decode step's
[32, 32000] fp32 logits on the development machine, ~3 % of the step. ``csrc/argmax_cpu.cpp`` does
it in ~0.02 ms with the same answer (the first maximum; the first NaN where a row has one).
"""

from __future__ import annotations

from pathlib import Path

import torch

from server import native
from server.native import load_kernel

SOURCE = Path(__file__).parent / "csrc" / "argmax_cpu.cpp"


def native_argmax_available() -> bool:
    """Builds the kernel on first call (once per machine); False where it cannot be built."""
    return load_kernel("loraplex_sampling_cpu", SOURCE, fakes=("loraplex_sampling_cpu::argmax_rows",))


def native_argmax_usable() -> bool:
    """Whether ``argmax_rows`` takes the kernel here: built, on a CPU with AVX-512 (without it the
    kernel is slower than torch's argmax: ``server.native.wide_vector_cpu``). Builds it only there."""
    return native.wide_vector_cpu() and native_argmax_available()


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """int64 [B]: ``logits.argmax(dim=-1)`` of a [B, V] tensor."""
    if (
        logits.device.type == "cpu"
        and logits.dtype == torch.float32
        and logits.dim() == 2
        and logits.shape[1] > 0
        and logits.stride(1) == 1
        and native_argmax_usable()
    ):
        out = torch.empty(logits.shape[0], dtype=torch.long)
        torch.ops.loraplex_sampling_cpu.argmax_rows(out, logits)
        return out
    return logits.argmax(dim=-1)
