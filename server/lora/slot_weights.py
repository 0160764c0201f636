"""One LoRA layer's slot weights: every resident adapter's A and B (and DoRA, bias), stacked.

``a [max_loras, in, max_rank]`` and ``b [max_loras, max_rank, out]`` hold PEFT's A and B
pre-transposed, so a delta is ``(x @ a[slot]) @ b[slot]`` with both operands row-major ("NN" GEMMs,
measured ~30% faster than the [r, in] / [out, r] layout for the small CPU matmuls of decode; the
kernels take any strides). Static shapes: activating an adapter is a copy into its slot, and the
batched op reads slots without gathers. The adapter scale and DoRA's per-row rescale are folded into
``b`` when a slot is written; DoRA also rescales its rows' base output (``y = g * (W x) + b0``) with
two per-slot vectors. A slot's unused rank columns are zero, so adapters of any rank share buffers.

The buffers may be views into one ``[max_loras, row]`` tensor shared by all layers (``slot_rows.py``),
so that one slot of every layer is one contiguous row. ``write_slot`` fills one slot's views, wherever
they live: the device buffers, or a host row that is copied there in one piece.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from server.lora.adapter import LoRAModuleWeights
from server.lora.errors import AdapterError


@dataclass(frozen=True)
class SlotView:
    """One slot of one layer: ``a`` [in, max_rank], ``b`` [max_rank, out], the rest [out]."""

    a: torch.Tensor
    b: torch.Tensor
    bias: torch.Tensor
    dora_scale: torch.Tensor
    dora_shift: torch.Tensor


@dataclass(frozen=True)
class SlotFacts:
    """What a slot holds, kept on the host so the forward can skip passes no slot needs."""

    rank: int = 0
    has_bias: bool = False
    is_dora: bool = False


@torch.no_grad()
def write_slot(
    view: SlotView, weights: LoRAModuleWeights | None, base_bias: torch.Tensor | None, name: str
) -> SlotFacts:
    """Writes one module's adapter weights into ``view`` (None: zeros, the module is left alone)."""
    view.a.zero_()
    view.b.zero_()
    view.bias.zero_()
    view.dora_scale.fill_(1.0)
    view.dora_shift.zero_()
    if weights is None:
        return SlotFacts()
    r = weights.rank
    if r > view.a.shape[1]:
        raise AdapterError(f"module '{name}': rank {r} exceeds max_lora_rank={view.a.shape[1]}")
    row_scale = torch.full((view.b.shape[1],), weights.scale, dtype=torch.float32)
    if weights.dora_g is not None:
        row_scale = row_scale * weights.dora_g
        shift = torch.zeros_like(weights.dora_g)
        if base_bias is not None:
            shift = (1 - weights.dora_g) * base_bias.float().cpu()
        view.dora_scale.copy_(weights.dora_g)
        view.dora_shift.copy_(shift)
    view.a[:, :r].copy_(weights.a.t())
    view.b[:r].copy_((weights.b * row_scale[:, None]).t())
    if weights.bias is not None:
        view.bias.copy_(weights.bias * row_scale)
    return SlotFacts(r, weights.bias is not None, weights.dora_g is not None)


class SlotWeights(nn.Module):
    """The stacked weights of one wrapped linear, plus host-side per-slot facts read every forward
    (without touching the device) to skip passes no slot needs."""

    def __init__(self, name: str, in_features: int, out_features: int, max_loras: int, max_rank: int,
                 device, dtype) -> None:  # fmt: skip
        super().__init__()
        self.name = name
        self.max_rank = max_rank
        kw = {"device": device, "dtype": dtype}
        self.register_buffer("a", torch.zeros(max_loras, in_features, max_rank, **kw), persistent=False)
        self.register_buffer("b", torch.zeros(max_loras, max_rank, out_features, **kw), persistent=False)
        self.register_buffer("bias", torch.zeros(max_loras, out_features, **kw), persistent=False)
        self.register_buffer("dora_scale", torch.ones(max_loras, out_features, **kw), persistent=False)
        self.register_buffer("dora_shift", torch.zeros(max_loras, out_features, **kw), persistent=False)
        self.rank = [0] * max_loras
        self.has_bias = [False] * max_loras
        self.is_dora = [False] * max_loras

    def view(self, slot: int) -> SlotView:
        return SlotView(
            self.a[slot], self.b[slot], self.bias[slot], self.dora_scale[slot], self.dora_shift[slot]
        )

    def set_facts(self, slot: int, facts: SlotFacts) -> None:
        self.rank[slot], self.has_bias[slot], self.is_dora[slot] = facts.rank, facts.has_bias, facts.is_dora

    def release(self) -> list[torch.Size]:
        """Frees the buffers, to be replaced by ``bind``; returns one slot's shape of each."""
        shapes = []
        for name in ("a", "b", "bias", "dora_scale", "dora_shift"):
            old = getattr(self, name)
            shapes.append(old.shape[1:])
            setattr(self, name, old.new_empty(0))
        return shapes

    def bind(self, stacked: SlotView) -> None:
        """Serves from ``stacked``: views of the same shapes (e.g. into one tensor shared by all layers)."""
        for name in ("a", "b", "bias", "dora_scale", "dora_shift"):
            setattr(self, name, getattr(stacked, name))

    def write(self, slot: int, weights: LoRAModuleWeights | None, base_bias: torch.Tensor | None) -> None:
        """Copies one module's adapter weights into ``slot`` (None: the adapter leaves it alone)."""
        self.set_facts(slot, write_slot(self.view(slot), weights, base_bias, self.name))

    def clear(self, slot: int) -> None:
        """Zeros the slot so a padded kernel adds exactly nothing for it."""
        self.write(slot, None, None)
