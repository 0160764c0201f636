"""What the LoRA code needs to know about the base model: its targetable linear layers.

Captured once from the loaded model so adapter validation (shapes, names) and DoRA precomputation
(base weights) do not need to walk the module tree again. Names are the HF module paths, i.e. PEFT's
keys without the ``base_model.model.`` prefix, so any PEFT adapter maps 1:1 onto the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LinearSpec:
    """Shape of one targetable linear; ``transposed`` is True for Conv1D (weight stored [in, out])."""

    name: str
    in_features: int
    out_features: int
    transposed: bool
    has_bias: bool


def linear_spec(name: str, module: nn.Module) -> LinearSpec | None:
    """The spec of ``module`` if it is a LoRA-targetable linear (nn.Linear or transformers' Conv1D)."""
    if isinstance(module, nn.Linear):
        return LinearSpec(name, module.in_features, module.out_features, False, module.bias is not None)
    if _is_conv1d(module):
        in_features, out_features = module.weight.shape
        return LinearSpec(name, in_features, out_features, True, module.bias is not None)
    return None


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 style, weight stored [in, out]: PEFT's fan_in_fan_out), matched by
    name so this module does not import transformers (1.5 s) just for an isinstance check."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


class BaseModelSpec:
    """Targetable linears of a base model (lm_head excluded) plus a handle on their weights.

    ``other_modules`` maps the names of the remaining leaf modules to their type so that an adapter
    targeting e.g. an embedding or the lm_head gets "unsupported" instead of "absent".
    """

    def __init__(
        self,
        linears: dict[str, LinearSpec],
        other_modules: dict[str, str],
        modules: dict[str, nn.Module] | None = None,
    ) -> None:
        self.linears = linears
        self.other_modules = other_modules
        self._modules = modules or {}

    @classmethod
    def from_model(cls, model: nn.Module) -> BaseModelSpec:
        """Walks ``model`` once; LoRA-wrapped layers (already injected) report their base layer."""
        output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        linears: dict[str, LinearSpec] = {}
        others: dict[str, str] = {}
        modules: dict[str, nn.Module] = {}
        wrapped_prefixes: list[str] = []
        for name, module in model.named_modules():
            if any(name.startswith(p) for p in wrapped_prefixes):
                continue
            base = module.base_layer if getattr(module, "is_lora_wrapper", False) else module
            if base is not module:
                wrapped_prefixes.append(name + ".")
            spec = linear_spec(name, base)
            if spec is not None and base is not output_embeddings:
                linears[name] = spec
                modules[name] = base
            elif name and not any(True for _ in module.children()):
                others[name] = "lm_head" if base is output_embeddings else type(base).__name__
        return cls(linears, others, modules)

    def module(self, name: str) -> nn.Module:
        """The base layer (nn.Linear or Conv1D) behind ``name``."""
        if name not in self._modules:
            raise KeyError(f"no base module recorded for {name!r}")
        return self._modules[name]

    def weight(self, name: str) -> torch.Tensor:
        """Base weight of ``name`` as an fp32 CPU tensor in nn.Linear layout [out, in]."""
        weight = self.module(name).weight.detach()
        if self.linears[name].transposed:
            weight = weight.t()
        return weight.to(device="cpu", dtype=torch.float32)

    def bias(self, name: str) -> torch.Tensor | None:
        """Base bias of ``name`` (fp32, CPU) or None."""
        bias = getattr(self._modules.get(name), "bias", None)
        return None if bias is None else bias.detach().to(device="cpu", dtype=torch.float32)
