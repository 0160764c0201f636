"""Many PEFT LoRA adapters, fast: ``adapter_config.json`` + ``adapter_model.safetensors`` with random
tensors of the right shapes, written directly (building a PEFT model per adapter takes ~1 s each;
this takes milliseconds). The files are exactly what ``save_pretrained`` writes for these targets,
so the server parses and validates them like any uploaded adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig

RANKS = (8, 16, 32, 64)


def _shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """(in, out) of each attention projection of the Llama-shaped model in ``model_dir``."""
    c = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    return {
        "q_proj": (c.hidden_size, q),
        "k_proj": (c.hidden_size, kv),
        "v_proj": (c.hidden_size, kv),
        "o_proj": (q, c.hidden_size),
    }


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
    shapes = _shapes(model_dir)
    layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    names = []
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        name = f"{prefix}-{i:04d}"
        names.append(name)
        out = store / name
        if (out / "adapter_model.safetensors").exists():
            continue
        r = ranks[i % len(ranks)]
        tensors = {}
        for layer in range(layers):
            for module in targets:
                d_in, d_out = shapes[module]
                key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
                tensors[f"{key}.lora_A.weight"] = (torch.randn(r, d_in, generator=g) / d_in**0.5).to(dtype)
                tensors[f"{key}.lora_B.weight"] = (torch.randn(d_out, r, generator=g) * 0.02).to(dtype)
        out.mkdir(parents=True, exist_ok=True)
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": str(model_dir),
            "r": r,
            "lora_alpha": 2 * r,
            "target_modules": list(targets),
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
        }
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
        save_file(tensors, str(out / "adapter_model.safetensors"))
    return names
