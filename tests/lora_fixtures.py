"""PEFT-made adapters and PEFT reference outputs for LoRA tests (reusable by engine/API tests).

Adapters are created by PEFT itself with ``init_lora_weights=False`` so they change the outputs, and
saved with ``save_pretrained`` (safetensors), exactly what a user would upload.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = ATTENTION + ["gate_proj", "up_proj", "down_proj"]


def load_base(base_dir: Path) -> torch.nn.Module:
    """The base model in fp32 eval mode (what PEFT and our layers are compared on)."""
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def make_peft_adapter(
    base_dir: Path,
    out_dir: Path,
    r: int = 8,
    lora_alpha: float | None = None,
    target_modules: list[str] | str = ATTENTION,
    use_rslora: bool = False,
    use_dora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    lora_bias: bool = False,
    layers_to_transform: list[int] | None = None,
    seed: int = 0,
    safe_serialization: bool = True,
    **extra: Any,
) -> Path:
    """Creates and saves a random (non-identity) PEFT LoRA adapter for the model in ``base_dir``.

    DoRA magnitudes start equal to the row norms (a no-op rescale), so they are perturbed here to
    make the DoRA path observable.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha if lora_alpha is not None else 2 * r,
        target_modules=target_modules,
        use_rslora=use_rslora,
        use_dora=use_dora,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        lora_bias=lora_bias,
        layers_to_transform=layers_to_transform,
        init_lora_weights=False,
        **extra,
    )
    model = get_peft_model(load_base(base_dir), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(torch.empty_like(param).uniform_(0.6, 1.4))
            elif "lora_B" in name and name.endswith("bias"):
                param.normal_(0.0, 0.5)
    model.save_pretrained(out_dir, safe_serialization=safe_serialization)
    return Path(out_dir)


@dataclass
class AdapterCase:
    """One adapter of the standard mixed set: its name and ``make_peft_adapter`` arguments."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


# >= 6 adapters mixing ranks (4, 8, 16, 64), target sets, rsLoRA, rank/alpha patterns, DoRA, lora_bias.
MIXED_CASES = [
    AdapterCase("attn-r4", dict(r=4, target_modules=ATTENTION, seed=1)),
    AdapterCase("all-r8-rslora", dict(r=8, target_modules=ALL_LINEAR, use_rslora=True, seed=2)),
    AdapterCase(
        "patterns-r16",
        dict(
            r=16,
            target_modules=ALL_LINEAR,
            rank_pattern={"v_proj": 4, "layers.1.mlp.down_proj": 8},
            alpha_pattern={"q_proj": 5, "layers.0.mlp.up_proj": 64},
            seed=3,
        ),
    ),
    AdapterCase("all-r64", dict(r=64, lora_alpha=32, target_modules=ALL_LINEAR, seed=4)),
    AdapterCase(
        "dora-r8", dict(r=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True, seed=5)
    ),
    AdapterCase("bias-r4", dict(r=4, target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True, seed=6)),
    AdapterCase("regex-layer1-r8", dict(r=8, target_modules=r".*\.1\.(self_attn|mlp)\.(o|up)_proj", seed=7)),
]


def make_mixed_adapters(
    base_dir: Path, root: Path, cases: list[AdapterCase] = MIXED_CASES
) -> dict[str, Path]:
    """Saves every case under ``root/<name>``; returns name -> directory."""
    return {case.name: make_peft_adapter(base_dir, root / case.name, **case.kwargs) for case in cases}


@torch.no_grad()
def peft_logits(base_dir: Path, adapter_dir: Path | None, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of PEFT's ``PeftModel`` with that single adapter active (or the base model if None)."""
    from peft import PeftModel

    model = load_base(base_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    return model(input_ids=input_ids).logits


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|: one number robust to near-zero entries."""
    return ((got - want).abs().max() / want.abs().max()).item()


def inject_and_load(
    base_dir: Path,
    adapter_dirs: dict[str, Path],
    max_loras: int = 8,
    max_rank: int = 64,
    backend: str = "torch",
    served_layers: bool = False,
):
    """Base model with LoRA injected and ``adapter_dirs`` written into slots 0, 1, ... (in order).

    ``served_layers``: the linears as the server loads them (q/k/v and gate/up fused, oneDNN-packed
    on CPU), with transformers' own attention, so plain forwards still work."""
    from server.lora.adapter import load_peft_adapter
    from server.lora.backend import make_lora_backend
    from server.lora.layers import inject_lora
    from server.lora.spec import BaseModelSpec
    from server.model.cpu_linear import use_packed_linears
    from server.model.fused_linear import fuse_projections

    model = load_base(base_dir)
    if served_layers:
        fuse_projections(model)
        use_packed_linears(model)
    handle = inject_lora(model, make_lora_backend(backend, "cpu", max_loras), max_rank)
    spec = BaseModelSpec.from_model(model)
    for slot, (name, path) in enumerate(adapter_dirs.items()):
        handle.set_slot(slot, load_peft_adapter(path, name, spec, max_rank))
    return model, handle, spec
