"""Merging an adapter into the base weights, for dedicated deployments at zero LoRA overhead.

``W' = W + s * B A`` (DoRA: ``W' = g * (W + s * B A)`` row-wise) and ``b' = b + s * g * lora_bias``:
the same row scale the serving layers fold into B, so merged and unmerged outputs agree. The
exported checkpoint is a plain HF model directory written atomically (temp dir + rename).
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from server.lora.adapter import LoRAAdapter, load_peft_adapter
from server.lora.errors import AdapterError
from server.lora.spec import BaseModelSpec
from server.store import replace_dir

# Weight files and the files save_pretrained writes itself are not copied from the base directory.
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json", ".h5", ".msgpack")
_NOT_COPIED_NAMES = {"config.json", "generation_config.json"}


@torch.no_grad()
def merge_adapter_into_model(model: nn.Module, adapter: LoRAAdapter) -> None:
    """Adds ``adapter`` into ``model``'s weights in place (computed in fp32, stored in the model dtype)."""
    spec = BaseModelSpec.from_model(model)
    for name, lora in adapter.modules.items():  # refuse before writing anything
        if name not in spec.linears:
            raise AdapterError(
                f"adapter '{adapter.name}': module '{name}' is absent from the model being merged into"
            )
        if lora.bias is not None and not spec.linears[name].has_bias:
            raise AdapterError(
                f"adapter '{adapter.name}': cannot merge lora_bias into '{name}', whose base layer has no bias"
            )
    for name, lora in adapter.modules.items():
        module = spec.module(name)
        weight = spec.weight(name)
        row_scale = torch.full((weight.shape[0],), lora.scale)
        merged = weight + lora.scale * (lora.b @ lora.a)
        if lora.dora_g is not None:
            merged = lora.dora_g[:, None] * merged
            row_scale = row_scale * lora.dora_g
        if spec.linears[name].transposed:
            merged = merged.t()
        module.weight.copy_(merged.to(module.weight.dtype))
        if lora.bias is not None:
            module.bias.add_((row_scale * lora.bias).to(module.bias.dtype))
        weights_changed = getattr(module, "weights_changed", None)
        if weights_changed is not None:  # a packed or fused copy of the weight (server.model) follows
            weights_changed()


def export_merged(
    base_dir: Path,
    adapter: Path | LoRAAdapter,
    out_dir: Path,
    *,
    max_rank: int | None = None,
    overwrite: bool = False,
    confine_to: Path | None = None,
) -> Path:
    """Writes base + merged adapter as a standalone HF checkpoint (safetensors, config, tokenizer); an
    adapter directory's files must resolve inside ``confine_to`` when it is set."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True to replace it)")
    config = AutoConfig.from_pretrained(base_dir)
    saved_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if not isinstance(adapter, LoRAAdapter):
        path = Path(adapter)
        spec = BaseModelSpec.from_model(model)
        adapter = load_peft_adapter(path, path.name, spec, max_rank or 1 << 30, confine_to)
    merge_adapter_into_model(model, adapter)
    if isinstance(saved_dtype, str):
        saved_dtype = getattr(torch, saved_dtype, None)
    if isinstance(saved_dtype, torch.dtype) and saved_dtype != torch.float32:
        model = model.to(saved_dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        for item in base_dir.iterdir():
            if (
                item.is_file()
                and item.name not in _NOT_COPIED_NAMES
                and not item.name.endswith(_NOT_COPIED_SUFFIXES)
            ):
                shutil.copy2(item, tmp / item.name)
        info = {"base": str(base_dir.resolve()), "adapter": adapter.name, "source": str(adapter.source or "")}
        (tmp / "loraplex_merge.json").write_text(json.dumps(info, indent=2) + "\n")
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
