"""Paged attention backends behind one seam (``base.AttentionBackend``), chosen once per process."""

from __future__ import annotations

from server.model.attention.base import AttentionBackend, SeqSpan, StepLayout
from server.model.attention.torch_paged import TorchPagedAttention

BACKENDS: dict[str, type[AttentionBackend]] = {"torch": TorchPagedAttention}


def attention_backend_class(name: str, device: str) -> type[AttentionBackend]:
    """``auto`` is the torch backend for now (the CPU reference; GPU backends register here)."""
    if name == "auto":
        name = "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected 'auto' or one of {sorted(BACKENDS)}")
    return BACKENDS[name]


__all__ = ["BACKENDS", "AttentionBackend", "SeqSpan", "StepLayout", "attention_backend_class"]
