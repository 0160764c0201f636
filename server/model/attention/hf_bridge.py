"""Plugs an ``AttentionBackend`` into Hugging Face models through transformers' attention interface.

The HF model keeps its own projections, RoPE and norms; only the attention core is ours. The model
runner calls the model on a *packed* batch ([1, T] tokens of many sequences back to back) with
``past_key_values=None`` and ``attn_backend=<backend>`` in the forward kwargs, which transformers
hands through to every attention layer; masks are implied by the packed layout, so none are built.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from server.model.attention.base import AttentionBackend

BACKEND_NAME = "loraplex_paged"


def _attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    attn_backend: AttentionBackend | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if attn_backend is None:
        raise RuntimeError("loraplex attention called without attn_backend (the model runner passes it)")
    out = attn_backend.forward(module.layer_idx, query, key, value, scaling, sliding_window, softcap)
    return out, None


def _no_mask(*args, **kwargs):
    return None


def register_attention_interface() -> str:
    """Registers the bridge under ``BACKEND_NAME`` (idempotent) and returns the name."""
    AttentionInterface.register(BACKEND_NAME, _attention)
    AttentionMaskInterface.register(BACKEND_NAME, _no_mask)
    return BACKEND_NAME
