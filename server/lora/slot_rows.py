"""Every LoRA layer's slot buffers as views of one ``[max_loras, row]`` tensor, so that an adapter's
slot - its A, B, bias and DoRA vectors in every layer - is one contiguous row.

Then activating an adapter is one copy: its row is packed on the host (off the engine thread when
it is prefetched; the padding, transposes and scale folding all happen there) and copied into the
slot in one piece (``slot_fill.py``). The kernels see the same ``a``/``b`` shapes as before, with a
larger slot stride.
"""

from __future__ import annotations

import torch

from server.lora.adapter import LoRAAdapter
from server.lora.layers import LoRAModel
from server.lora.slot_weights import SlotFacts, SlotView, write_slot


class SlotRows:
    def __init__(self, lora: LoRAModel) -> None:
        self.lora = lora
        self._layers = list(lora.layers.items())
        first = self._layers[0][1].slot_weights.a
        self.device, self.dtype = first.device, first.dtype
        self._offsets: list[int] = []
        width = 0
        for _, layer in self._layers:
            self._offsets.append(width)
            width += sum(t[0].numel() for t in self._parts(layer.slot_weights))
        self.width = width
        self.storage = torch.zeros(lora.max_loras, width, device=self.device, dtype=self.dtype)
        for (_, layer), offset in zip(self._layers, self._offsets, strict=True):
            layer.slot_weights.rebind(self._views(self.storage, offset, layer.slot_weights))
        # Base biases on the host, once: packing runs on loader threads and must not touch the device.
        self._base_bias = {
            name: None if layer.base_layer.bias is None else layer.base_layer.bias.detach().float().cpu()
            for name, layer in self._layers
        }

    @staticmethod
    def _parts(sw) -> list[torch.Tensor]:
        return [sw.a, sw.b, sw.bias, sw.dora_scale, sw.dora_shift]

    def _views(self, rows: torch.Tensor, offset: int, sw) -> SlotView:
        """``rows`` [..., width] -> this layer's tensors with the leading dims of ``rows``."""
        lead = rows.shape[:-1]
        views = []
        for part in self._parts(sw):
            shape = part.shape[1:]
            n = shape.numel()
            views.append(rows[..., offset : offset + n].view(*lead, *shape))
            offset += n
        return SlotView(*views)

    def new_row(self, pin_memory: bool = False) -> torch.Tensor:
        """A host row to pack into (pinned, for asynchronous copies to a CUDA device)."""
        return torch.empty(self.width, dtype=self.dtype, pin_memory=pin_memory)

    def pack(self, adapter: LoRAAdapter | None, row: torch.Tensor) -> list[SlotFacts]:
        """Writes ``adapter`` into ``row`` (a [width] tensor: a host row, or a slot of ``storage``) as
        its slot holds it; every element is written, modules it does not target get zeros (None: an
        empty slot)."""
        modules = {}
        if adapter is not None:
            self.lora.check(adapter)
            modules = adapter.modules
        facts = []
        for (name, layer), offset in zip(self._layers, self._offsets, strict=True):
            view = self._views(row, offset, layer.slot_weights)
            facts.append(write_slot(view, modules.get(name), self._base_bias[name], name))
        return facts

    def commit(self, slot: int, facts: list[SlotFacts]) -> None:
        """Records what ``slot`` now holds (engine thread: the forward reads these facts)."""
        for (_, layer), layer_facts in zip(self._layers, facts, strict=True):
            layer.slot_weights.set_facts(slot, layer_facts)

    def clear(self, slot: int) -> None:
        self.commit(slot, self.pack(None, self.storage[slot]))
