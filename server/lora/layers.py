"""LoRA-wrapped linears and their injection into an HF model.

Each targetable linear is replaced in place by a ``LoRALinear`` that runs the frozen base layer,
then lets the process's ``LoRABackend`` add every row's adapter delta from the layer's
``SlotWeights``. PEFT's module names are kept (the wrapper sits where the linear was), so any PEFT
adapter maps 1:1 onto the model.

Fused sibling projections (``server.model.fused_linear``: q/k/v, gate/up run as one GEMM) get one
``SlotWeights`` for the whole group, and the group's delta hook (``GroupDelta``) adds every member's
delta to the fused output in one op before the members take their slices; their wrappers then only
name the member (for adapter writes) and add nothing themselves. A group whose members are not all
targeted keeps per-member deltas on the members' slices.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from server.lora.adapter import LoRAAdapter
from server.lora.backend import LoRABackend
from server.lora.errors import AdapterError
from server.lora.slot_weights import SlotWeights, largest_stored_value
from server.lora.spec import BaseModelSpec, LinearSpec
from server.model.fused_linear import FusedProjection, fused_projection_of


class LoRALinear(nn.Module):
    """``y = base(x)``, then each row adds the delta of its slot (none for base-model rows).

    ``member`` is this module's index in ``slot_weights`` (a fused group's are shared); with
    ``adds_delta=False`` the group's hook already added it inside ``base(x)``.
    """

    is_lora_wrapper = True  # lets BaseModelSpec see through the wrapper

    def __init__(self, base_layer: nn.Module, spec: LinearSpec, backend: LoRABackend,
                 slot_weights: SlotWeights, member: int = 0, adds_delta: bool = True):  # fmt: skip
        super().__init__()
        self.base_layer = base_layer
        self.spec = spec
        self.backend = backend
        self.slot_weights = slot_weights
        self.member = member
        self.adds_delta = adds_delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self.adds_delta or not self.backend.active:
            return y
        if not y.is_contiguous():  # the deltas are written in place through a flat view
            y = y.contiguous()
        x2 = x.reshape(-1, self.spec.in_features)
        self.backend.apply(y.view(-1, self.spec.out_features), x2, self.slot_weights)
        return y

    def extra_repr(self) -> str:
        weights = self.slot_weights
        fused = "" if self.adds_delta else f", fused member {self.member} of {weights.names}"
        return (f"slots={weights.num_slots}, pages={weights.table.num_pages}, max_rank={weights.max_rank}, "
                f"backend={self.backend.name}{fused}")  # fmt: skip


class GroupDelta:
    """A fused projection's delta hook: every member's LoRA delta in one op on the fused output."""

    def __init__(self, backend: LoRABackend, slot_weights: SlotWeights) -> None:
        self.backend = backend
        self.slot_weights = slot_weights

    def __call__(self, y: torch.Tensor, x: torch.Tensor) -> None:
        if self.backend.active:
            self.backend.apply(y, x, self.slot_weights)


class LoRAModel:
    """Handle on an injected model: its LoRA layers, the shared backend, and slot writes."""

    def __init__(self, layers: dict[str, LoRALinear], backend: LoRABackend, max_loras: int, max_rank: int,
                 num_pages: int | None = None):  # fmt: skip
        self.layers = layers
        self.backend = backend
        self.max_loras = max_loras  # slots: adapters resident at once, at most
        self.max_rank = max_rank
        self.num_pages = num_pages  # rank blocks of slot memory (None: each slot owns max_rank of them)

    def check(self, adapter: LoRAAdapter) -> None:
        """Raises AdapterError if ``adapter`` cannot be served here: ``check_fits``, and in float16 slots
        values past float16's range. Run where adapters come in (the reader, compositions)."""
        self.check_fits(adapter)
        for name, weights in adapter.modules.items():
            layer = self.layers[name]
            if layer.slot_weights.b.dtype != torch.float16:
                continue
            if largest_stored_value(weights, layer.base_layer.bias) > torch.finfo(torch.float16).max:
                raise AdapterError(
                    f"adapter '{adapter.name}': module '{name}' has weights (scaled by alpha/r) past "
                    "float16's range; serve it with lora_dtype=bfloat16 or auto"
                )

    def check_fits(self, adapter: LoRAAdapter) -> None:
        """Raises AdapterError if ``adapter`` needs a module or rank this injection cannot hold (cheap:
        a slot fill runs it; ``check``'s pass over the values ran when the adapter came in)."""
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
            layer.slot_weights.write(slot, layer.member, adapter.modules.get(name), layer.base_layer.bias)

    def clear_slot(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.slot_weights.clear(slot, layer.member)


def inject_lora(
    model: nn.Module,
    backend: LoRABackend,
    max_rank: int,
    target_names: Iterable[str] | None = None,
    dtype: torch.dtype | None = None,
    num_pages: int | None = None,
) -> LoRAModel:
    """Wraps the targetable linears of ``model`` in place (all but lm_head by default), with
    ``backend.max_loras`` slots of rank up to ``max_rank`` each; the slots hold adapter weights in
    ``dtype`` (None: the model's; see ``lora_slot_dtype``). ``num_pages``: the slots share that many
    pages of 16 ranks, handed out by ``SlotRows`` (None: each slot owns ``max_rank`` of them)."""
    spec = BaseModelSpec.from_model(model)
    if any(getattr(m, "is_lora_wrapper", False) for m in model.modules()):
        raise ValueError("model already has LoRA layers injected")
    names = list(spec.linears) if target_names is None else list(target_names)
    unknown = sorted(set(names) - spec.linears.keys())
    if unknown:
        raise ValueError(f"not targetable linear modules of this model: {unknown[:5]}")
    groups: dict[FusedProjection, list[str]] = {}
    for name in names:
        fused = fused_projection_of(spec.module(name))
        if fused is not None:
            groups.setdefault(fused, []).append(name)
    layers: dict[str, LoRALinear] = {}
    for fused, members in groups.items():
        if len(members) < len(fused.slices):
            continue  # not every member targeted: each wraps on its own below
        members.sort(key=lambda n: spec.module(n).fused_index)
        weights = _slot_weights(spec, members, backend.max_loras, max_rank, dtype, num_pages)
        fused.delta = GroupDelta(backend, weights)
        for index, name in enumerate(members):
            layers[name] = _wrap(model, spec, name, backend, weights, index, adds_delta=False)
    for name in names:
        if name not in layers:
            weights = _slot_weights(spec, [name], backend.max_loras, max_rank, dtype, num_pages)
            layers[name] = _wrap(model, spec, name, backend, weights, 0, adds_delta=True)
    return LoRAModel({name: layers[name] for name in names}, backend, backend.max_loras, max_rank, num_pages)


def lora_slot_dtype(model_dtype: torch.dtype, requested: str) -> torch.dtype:
    """``Settings.lora_dtype`` under a model of ``model_dtype``: 'auto' is the model's; a half-width
    dtype is taken under a float32 model (the kernels widen the weights and compute in fp32). A
    different dtype under a half-precision model is refused: it would add bytes or a second rounding
    for nothing."""
    if requested == "auto":
        return model_dtype
    dtype = getattr(torch, requested)
    if dtype != model_dtype and model_dtype != torch.float32:
        raise ValueError(
            f"lora_dtype={requested} under a {str(model_dtype).removeprefix('torch.')} model: use 'auto' "
            "(a narrower adapter dtype is for float32 models)"
        )
    return dtype


def _slot_weights(spec: BaseModelSpec, names: list[str], max_loras: int, max_rank: int,
                  dtype: torch.dtype | None, num_pages: int | None) -> SlotWeights:  # fmt: skip
    linears = [spec.linears[n] for n in names]
    weight = spec.module(names[0]).weight
    return SlotWeights(names, linears[0].in_features, [lin.out_features for lin in linears], max_loras,
                       max_rank, weight.device, dtype or weight.dtype, num_pages)  # fmt: skip


def _wrap(model, spec, name, backend, weights, member, adds_delta) -> LoRALinear:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layer = LoRALinear(spec.module(name), spec.linears[name], backend, weights, member, adds_delta)
    setattr(parent, child, layer)
    return layer
