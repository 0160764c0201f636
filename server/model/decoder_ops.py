"""The decoder layer's elementwise steps as native CPU ops (``csrc/decoder_ops_cpu.cpp``): RMSNorm,
RoPE and SiLU(gate) * up, each one call where the eager forms are several tensor ops. Used by
``native_norm`` (RMSNorm modules) and ``lean_forward``; every caller checks ``decoder_ops_available``
and keeps the torch form where it is False or an input is not one the op takes."""

from __future__ import annotations

from pathlib import Path

import torch

from server.native import load_kernel

SOURCE = Path(__file__).parent / "csrc" / "decoder_ops_cpu.cpp"
OPS = ("rms_norm", "rope", "silu_mul")


def decoder_ops_available() -> bool:
    """Builds the ops on first call (once per machine); False where they cannot be built."""
    return load_kernel(
        "loraplex_decoder_cpu", SOURCE, fakes=tuple(f"loraplex_decoder_cpu::{op}" for op in OPS)
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm of ``x`` [..., H] (fp32 or bf16, the weight's dtype): a new tensor."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty_like(rows, memory_format=torch.contiguous_format)
    torch.ops.loraplex_decoder_cpu.rms_norm(out, rows, weight, eps)
    return out.view(x.shape)


def rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """HF's apply_rotary_pos_emb, in place: q [T, H, D], k [T, KVH, D], cos, sin [T, D], one dtype."""
    torch.ops.loraplex_decoder_cpu.rope(q, k, cos, sin)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` for fp32 [T, I] inputs with contiguous rows (any row stride)."""
    out = gate.new_empty(gate.shape)
    torch.ops.loraplex_decoder_cpu.silu_mul(out, gate, up)
    return out
