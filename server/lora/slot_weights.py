"""One LoRA layer's slot weights: every resident adapter's A and B (and DoRA, bias), stacked.

``a [max_loras, in, max_rank]`` and ``b [max_loras, max_rank, out]`` hold PEFT's A and B
pre-transposed, so a delta is ``(x @ a[slot]) @ b[slot]`` with both operands row-major ("NN" GEMMs,
measured ~30% faster than the [r, in] / [out, r] layout for the small CPU matmuls of decode; the
kernels take any strides). Static shapes: activating an adapter is a copy into its slot, and the
batched op reads slots without gathers. The adapter scale and DoRA's per-row rescale are folded into
``b`` when a slot is written; DoRA also rescales its rows' base output (``y = g * (W x) + b0``) with
two per-slot vectors. A slot's unused rank columns are zero, so adapters of any rank share buffers.
"""

from __future__ import annotations

import torch
from torch import nn

from server.lora.adapter import LoRAModuleWeights
from server.lora.errors import AdapterError


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

    @torch.no_grad()
    def write(self, slot: int, weights: LoRAModuleWeights | None, base_bias: torch.Tensor | None) -> None:
        """Copies one module's adapter weights into ``slot`` (None: the adapter leaves it alone)."""
        self.clear(slot)
        if weights is None:
            return
        r = weights.rank
        if r > self.max_rank:
            raise AdapterError(f"module '{self.name}': rank {r} exceeds max_lora_rank={self.max_rank}")
        row_scale = torch.full((self.b.shape[2],), weights.scale, dtype=torch.float32)
        if weights.dora_g is not None:
            row_scale = row_scale * weights.dora_g
            shift = torch.zeros_like(weights.dora_g)
            if base_bias is not None:
                shift = (1 - weights.dora_g) * base_bias.float().cpu()
            self.dora_scale[slot].copy_(weights.dora_g)
            self.dora_shift[slot].copy_(shift)
            self.is_dora[slot] = True
        self.a[slot, :, :r].copy_(weights.a.t())
        self.b[slot, :r].copy_((weights.b * row_scale[:, None]).t())
        if weights.bias is not None:
            self.bias[slot].copy_(weights.bias * row_scale)
            self.has_bias[slot] = True
        self.rank[slot] = r

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        """Zeros the slot so a padded kernel adds exactly nothing for it."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.bias[slot].zero_()
        self.dora_scale[slot].fill_(1.0)
        self.dora_shift[slot].zero_()
        self.rank[slot] = 0
        self.has_bias[slot] = False
        self.is_dora[slot] = False
