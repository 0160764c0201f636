"""Many PEFT LoRA adapters, fast, for the many-adapter and prefix-caching benchmarks: written
directly by ``benchmarks.random_adapters`` (building a PEFT model per adapter takes ~1 s each; this
takes milliseconds), so the server parses and validates them like any uploaded adapter.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig

from benchmarks.random_adapters import write_random_adapter

RANKS = (8, 16, 32, 64)


def write_random_adapters(
    model_dir: Path,
    store: Path,
    count: int,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    ranks: tuple[int, ...] = RANKS,
    prefix: str = "lora",
    dtype: torch.dtype = torch.bfloat16,
) -> list[str]:
    """``count`` adapters ``<prefix>-<i>`` under ``store`` (kept if already there), rank ``ranks[i % n]``."""
    config = AutoConfig.from_pretrained(model_dir)
    names = [f"{prefix}-{i:04d}" for i in range(count)]
    for i, name in enumerate(names):
        write_random_adapter(
            store / name, config, rank=ranks[i % len(ranks)], seed=i, dtype=dtype, targets=targets
        )
    return names
