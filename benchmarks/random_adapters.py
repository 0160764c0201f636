"""Random PEFT LoRA adapters written straight to disk (no PEFT model built): any count, any shape.

Each adapter is what ``PeftModel.save_pretrained`` writes for a Llama-style model with LoRA on all
seven projections: ``adapter_config.json`` and ``adapter_model.safetensors`` with
``base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A,B}.weight``. Generating on a GPU
and writing bf16 keeps 64 adapters of an 8B shape to seconds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.lora_bench import ALL_LINEAR
from benchmarks.roofline import ModelShape

_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}  # fmt: skip


def projection_shapes(config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each of the seven projections of one decoder layer."""
    return ModelShape.from_config(config).projection_dims()


def adapter_bytes(config, rank: int, element_size: int = 2) -> int:
    """Bytes of A and B over every layer: what a decode step reads per distinct adapter."""
    per_layer = sum(rank * (d_in + d_out) for d_in, d_out in projection_shapes(config).values())
    return per_layer * config.num_hidden_layers * element_size


def write_random_adapter(
    out_dir: Path, config, rank: int = 16, seed: int = 0, std: float = 0.01,
    dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
    targets: Sequence[str] = ALL_LINEAR,
) -> Path:  # fmt: skip
    """One adapter with N(0, std) A and B on ``targets`` (default all seven projections;
    ``lora_alpha = 2 * rank``). Kept if already there; the weights file is written last, so an
    interrupted write is redone."""
    out_dir = Path(out_dir)
    if (out_dir / "adapter_model.safetensors").exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=device).manual_seed(seed)
    shapes = projection_shapes(config)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for proj in targets:
            d_in, d_out = shapes[proj]
            prefix = f"base_model.model.model.layers.{layer}.{_PARENT[proj]}.{proj}"
            for role, shape in (("lora_A", (rank, d_in)), ("lora_B", (d_out, rank))):
                t = torch.randn(shape, generator=g, device=device, dtype=torch.float32) * std
                tensors[f"{prefix}.{role}.weight"] = t.to(dtype).cpu()
    peft_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
                   "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
                   "inference_mode": True, "base_model_name_or_path": None}  # fmt: skip
    (out_dir / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    return out_dir
