"""Paged attention backends behind one seam (``base.AttentionBackend``), chosen once per process.

Backends are imported by name when chosen, so importing this package never imports Triton or
FlashInfer (Triton reads ``TRITON_INTERPRET`` when its kernels are first defined).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from server.model.attention.base import (
    AttentionBackend,
    SeqSpan,
    StepLayout,
    StepTensors,
    UnsupportedModelError,
)

BACKENDS: dict[str, str] = {  # name -> "module:Class"
    "torch": "server.model.attention.torch_paged:TorchPagedAttention",
    "triton": "server.model.attention.triton_paged:TritonPagedAttention",
    "flashinfer": "server.model.attention.flashinfer_paged:FlashInferPagedAttention",
}


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def available(name: str, device: str | torch.device) -> str | None:
    """None if backend ``name`` can run on ``device``, else why not."""
    cuda = torch.device(device).type == "cuda"
    if name == "triton":
        interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        if not _importable("triton"):
            return "triton is not installed"
        return None if cuda or interpreted else "needs a CUDA device (or TRITON_INTERPRET=1)"
    if name == "flashinfer":
        if not _importable("flashinfer"):
            return "flashinfer is not installed (pip install flashinfer-python)"
        return None if cuda else "needs a CUDA device"
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
