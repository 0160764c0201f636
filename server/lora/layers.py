"""LoRA-wrapped linears and their injection into an HF model.

Each targetable linear is replaced in place by a ``LoRALinear`` that runs the frozen base layer,
then lets the process's ``LoRABackend`` add every row's adapter delta from the layer's
``SlotWeights``. PEFT's module names are kept (the wrapper sits where the linear was), so any PEFT
adapter maps 1:1 onto the model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from server.lora.adapter import LoRAAdapter
from server.lora.backend import LoRABackend
from server.lora.errors import AdapterError
from server.lora.slot_weights import SlotWeights
from server.lora.spec import BaseModelSpec, LinearSpec


class LoRALinear(nn.Module):
    """``y = base(x)``, then each row adds the delta of its slot (none for base-model rows)."""

    is_lora_wrapper = True  # lets BaseModelSpec see through the wrapper

    def __init__(
        self, base_layer: nn.Module, spec: LinearSpec, backend: LoRABackend, slot_weights: SlotWeights
    ):
        super().__init__()
        self.base_layer = base_layer
        self.spec = spec
        self.backend = backend
        self.slot_weights = slot_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self.backend.batch.segments:
            return y
        if not y.is_contiguous():  # the deltas are written in place through a flat view
            y = y.contiguous()
        x2 = x.reshape(-1, self.spec.in_features)
        self.backend.apply(y.view(-1, self.spec.out_features), x2, self.slot_weights)
        return y

    def extra_repr(self) -> str:
        slots, rank = self.slot_weights.a.shape[0], self.slot_weights.max_rank
        return f"max_loras={slots}, max_rank={rank}, backend={self.backend.name}"


class LoRAModel:
    """Handle on an injected model: its LoRA layers, the shared backend, and slot writes."""

    def __init__(self, layers: dict[str, LoRALinear], backend: LoRABackend, max_loras: int, max_rank: int):
        self.layers = layers
        self.backend = backend
        self.max_loras = max_loras
        self.max_rank = max_rank

    def check(self, adapter: LoRAAdapter) -> None:
        """Raises AdapterError if ``adapter`` needs a module or rank this injection cannot hold."""
        for name, weights in adapter.modules.items():
            if name not in self.layers:
                raise AdapterError(
                    f"adapter '{adapter.name}': module '{name}' is not LoRA-enabled on this server"
                )
            if weights.rank > self.max_rank:
                raise AdapterError(
                    f"adapter '{adapter.name}': rank {weights.rank} exceeds max_lora_rank={self.max_rank}"
                )

    def set_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        """Writes every module of ``adapter`` into ``slot``; modules it does not target get zeros."""
        self.check(adapter)
        for name, layer in self.layers.items():
            layer.slot_weights.write(slot, adapter.modules.get(name), layer.base_layer.bias)

    def clear_slot(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.slot_weights.clear(slot)


def inject_lora(
    model: nn.Module, backend: LoRABackend, max_rank: int, target_names: Iterable[str] | None = None
) -> LoRAModel:
    """Wraps the targetable linears of ``model`` in place (all but lm_head by default), with one slot
    per ``backend.max_loras`` of rank up to ``max_rank`` each."""
    max_loras = backend.max_loras
    spec = BaseModelSpec.from_model(model)
    if any(getattr(m, "is_lora_wrapper", False) for m in model.modules()):
        raise ValueError("model already has LoRA layers injected")
    names = list(spec.linears) if target_names is None else list(target_names)
    unknown = sorted(set(names) - spec.linears.keys())
    if unknown:
        raise ValueError(f"not targetable linear modules of this model: {unknown[:5]}")
    layers: dict[str, LoRALinear] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        linear = spec.linears[name]
        weight = base.weight
        slot_weights = SlotWeights(name, linear.in_features, linear.out_features, max_loras, max_rank,
                              weight.device, weight.dtype)  # fmt: skip
        layer = LoRALinear(base, linear, backend, slot_weights)
        setattr(parent, child, layer)
        layers[name] = layer
    return LoRAModel(layers, backend, max_loras, max_rank)
