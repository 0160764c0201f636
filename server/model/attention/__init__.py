"""Paged attention backends behind one seam (``base.AttentionBackend``), chosen once per process.

Backends are imported by name when chosen, so importing this package never imports Triton or
FlashInfer (Triton reads ``TRITON_INTERPRET`` when its kernels are first defined).
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from server.model.attention.base import (
    AttentionBackend,
    SeqSpan,
    StepLayout,
    StepTensors,
    UnsupportedModelError,
)
from server.triton_support import triton_unavailable

BACKENDS: dict[str, str] = {  # name -> "module:Class"
    "torch": "server.model.attention.torch_paged:TorchPagedAttention",
    "triton": "server.model.attention.triton_paged:TritonPagedAttention",
    "flashinfer": "server.model.attention.flashinfer_paged:FlashInferPagedAttention",
}


def available(name: str, device: str | torch.device) -> str | None:
    """None if backend ``name`` can run on ``device``, else why not."""
    if name == "triton":
        return triton_unavailable(device)
    if name == "flashinfer":
        if importlib.util.find_spec("flashinfer") is None:
            return "flashinfer is not installed (pip install flashinfer-python)"
        return None if torch.device(device).type == "cuda" else "needs a CUDA device"
    return None


def resolve_backend_name(name: str, device: str | torch.device) -> str:
    """``auto``: FlashInfer if importable on CUDA, else Triton on CUDA, else torch (the CPU reference)."""
    if name == "auto":
        if torch.device(device).type != "cuda":
            return "torch"
        return next(b for b in ("flashinfer", "triton", "torch") if available(b, device) is None)
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected 'auto' or one of {sorted(BACKENDS)}")
    reason = available(name, device)
    if reason is not None:
        raise ValueError(f"attention backend {name!r} cannot run on {device}: {reason}")
    return name


def attention_backend_class(name: str, device: str | torch.device) -> type[AttentionBackend]:
    """The class of backend ``name`` (after resolving ``auto``) for ``device``."""
    module, _, cls = BACKENDS[resolve_backend_name(name, device)].partition(":")
    return getattr(importlib.import_module(module), cls)


__all__ = [
    "BACKENDS",
    "AttentionBackend",
    "SeqSpan",
    "StepLayout",
    "StepTensors",
    "UnsupportedModelError",
    "attention_backend_class",
    "available",
    "resolve_backend_name",
]
