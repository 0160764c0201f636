"""Weighted composition of LoRA adapters into one virtual adapter, exact by construction.

``sum_i w_i * s_i * B_i A_i`` equals ``[w_1 s_1 B_1, ..., w_n s_n B_n] @ [A_1; ...; A_n]``: concatenating
along the rank keeps the sum exact (no SVD truncation) and lets the composition use a single slot
and the same batched op as any adapter (PEFT's ``add_weighted_adapter(combination_type="cat")``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from server.lora.adapter import LoRAAdapter, LoRAModuleWeights
from server.lora.errors import AdapterError


def compose_adapters(
    parts: Sequence[tuple[LoRAAdapter, float]], name: str, max_rank: int | None = None
) -> LoRAAdapter:
    """One adapter whose delta on every module is the weighted sum of the parts' deltas (scale 1).

    Modules are the union of the parts' modules; a part that does not touch a module contributes
    nothing there. DoRA parts are refused (their rescale is not linear in the weights), and so is a
    composition whose concatenated rank on some module exceeds ``max_rank``.
    """
    if not parts:
        raise AdapterError(f"composition '{name}': needs at least one adapter")
    for adapter, weight in parts:
        if adapter.is_dora:
            raise AdapterError(
                f"composition '{name}': adapter '{adapter.name}' uses DoRA, whose magnitude rescale is not "
                "linear and cannot be composed; serve it alone or merge it"
            )
        if not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise AdapterError(
                f"composition '{name}': weight of '{adapter.name}' must be a finite number, got {weight!r}"
            )
    names: list[str] = []
    for adapter, _ in parts:
        names.extend(m for m in adapter.modules if m not in names)
    modules: dict[str, LoRAModuleWeights] = {}
    for module in names:
        pieces = [(a.modules[module], float(w)) for a, w in parts if module in a.modules]
        rank = sum(p.rank for p, _ in pieces)
        if max_rank is not None and rank > max_rank:
            raise AdapterError(
                f"composition '{name}': module '{module}' needs rank {rank} (sum of the parts), "
                f"above max_lora_rank={max_rank}"
            )
        biases = [w * p.scale * p.bias for p, w in pieces if p.bias is not None]
        modules[module] = LoRAModuleWeights(
            a=torch.cat([p.a for p, _ in pieces], dim=0),
            b=torch.cat([w * p.scale * p.b for p, w in pieces], dim=1),
            scale=1.0,
            bias=torch.stack(biases).sum(0) if biases else None,
        )
    return LoRAAdapter(name=name, modules=modules, parts=[(a.name, float(w)) for a, w in parts])
