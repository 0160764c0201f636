"""Where Triton kernels can run: on a CUDA device, or anywhere under Triton's interpreter
(``TRITON_INTERPRET=1``, how the tests run them on the CPU). Shared by the LoRA and attention backends."""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_unavailable(device: torch.device | str) -> str | None:
    """None when Triton kernels can run on ``device``, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return None
    return None if torch.device(device).type == "cuda" else "needs a CUDA device (or TRITON_INTERPRET=1)"
