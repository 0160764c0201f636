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
    """Lays the slots of freshly injected layers (all empty) out as rows of one ``storage`` tensor.

    The layers' own buffers are released before ``storage`` is allocated, so the slots never take
    twice their memory, even briefly.
    """

    def __init__(self, lora: LoRAModel) -> None:
        self.lora = lora
        self._layers = list(lora.layers.items())
        if any(any(layer.slot_weights.rank) for _, layer in self._layers):
            raise ValueError("slot rows are laid out over empty slots, right after inject_lora")
        first = self._layers[0][1].slot_weights.a
        self.device, self.dtype = first.device, first.dtype
        self._shapes = [layer.slot_weights.release() for _, layer in self._layers]
        self._offsets: list[int] = []
        width = 0
        for shapes in self._shapes:
            self._offsets.append(width)
            width += sum(shape.numel() for shape in shapes)
        self.width = width
        self.storage = torch.empty(lora.max_loras, width, device=self.device, dtype=self.dtype)
        # Base biases on the host, once: packing runs on loader threads and must not touch the device.
        self.host_pass_slots: set[int] = set()  # slots holding DoRA or lora_bias weights (host passes)
        self._base_bias = {
            name: None if layer.base_layer.bias is None else layer.base_layer.bias.detach().float().cpu()
            for name, layer in self._layers
        }
        for i, (_, layer) in enumerate(self._layers):
            layer.slot_weights.bind(self._views(self.storage, i))
        for slot in range(lora.max_loras):
            self.clear(slot)

    def _views(self, rows: torch.Tensor, layer: int) -> SlotView:
        """``rows`` [..., width] -> layer ``layer``'s tensors, with the leading dims of ``rows``."""
        lead, offset = rows.shape[:-1], self._offsets[layer]
        views = []
        for shape in self._shapes[layer]:
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
        return [
            write_slot(self._views(row, i), modules.get(name), self._base_bias[name], name)
            for i, (name, _) in enumerate(self._layers)
        ]

    def commit(self, slot: int, facts: list[SlotFacts]) -> None:
        """Records what ``slot`` now holds (engine thread: the forward reads these facts)."""
        for (_, layer), layer_facts in zip(self._layers, facts, strict=True):
            layer.slot_weights.set_facts(slot, layer_facts)
        if any(f.has_bias or f.is_dora for f in facts):
            self.host_pass_slots.add(slot)
        else:
            self.host_pass_slots.discard(slot)

    def clear(self, slot: int) -> None:
        self.commit(slot, self.pack(None, self.storage[slot]))
