"""Every LoRA target's slot buffers as views of one ``[max_loras, row]`` tensor, so that an adapter's
slot - its A, B, bias and DoRA vectors in every layer - is one contiguous row.

Then activating an adapter is one copy: its row is packed on the host (off the engine thread when
it is prefetched; the padding, rank blocking, transposes and scale folding all happen there) and
copied into the slot in one piece (``slot_fill.py``). The kernels see the same ``a``/``b`` shapes as
before, with a larger slot stride.
"""

from __future__ import annotations

import torch

from server.lora.adapter import LoRAAdapter
from server.lora.layers import LoRAModel
from server.lora.slot_weights import BUFFERS, MemberFacts, SlotView, SlotWeights, clear_view, write_member

TargetFacts = list[MemberFacts]  # one entry per member of a target


class SlotRows:
    """Lays the slots of freshly injected targets (all empty) out as rows of one ``storage`` tensor.

    The targets' own buffers are released before ``storage`` is allocated, so the slots never take
    twice their memory, even briefly.
    """

    def __init__(self, lora: LoRAModel) -> None:
        self.lora = lora
        targets: dict[int, SlotWeights] = {}  # a fused group's members share one target
        for layer in lora.layers.values():
            targets.setdefault(id(layer.slot_weights), layer.slot_weights)
        self._targets = list(targets.values())
        if any(any(any(ranks) for ranks in t.rank) for t in self._targets):
            raise ValueError("slot rows are laid out over empty slots, right after inject_lora")
        first = self._targets[0].a
        self.device, self.dtype = first.device, first.dtype
        self._shapes = [target.release() for target in self._targets]
        self._offsets: list[int] = []
        width = 0
        for shapes in self._shapes:
            self._offsets.append(width)
            width += sum(shape.numel() for shape in shapes)
        self.width = width
        self.storage = torch.empty(lora.max_loras, width, device=self.device, dtype=self.dtype)
        # Base biases on the host, once: packing runs on loader threads and must not touch the device.
        self._base_bias = {
            name: None if layer.base_layer.bias is None else layer.base_layer.bias.detach().float().cpu()
            for name, layer in lora.layers.items()
        }
        for i, target in enumerate(self._targets):
            target.bind(self._views(self.storage, i))
        for slot in range(lora.max_loras):
            self.clear(slot)

    def _views(self, rows: torch.Tensor, target: int) -> SlotView:
        """``rows`` [..., width] -> target ``target``'s tensors, with the leading dims of ``rows``."""
        lead, offset = rows.shape[:-1], self._offsets[target]
        views = []
        for shape in self._shapes[target]:
            n = shape.numel()
            views.append(rows[..., offset : offset + n].view(*lead, *shape))
            offset += n
        assert len(views) == len(BUFFERS)
        return SlotView(*views)

    def new_row(self, pin_memory: bool = False) -> torch.Tensor:
        """A host row to pack into (pinned, for asynchronous copies to a CUDA device)."""
        return torch.empty(self.width, dtype=self.dtype, pin_memory=pin_memory)

    @torch.no_grad()
    def pack(
        self, adapter: LoRAAdapter | None, row: torch.Tensor, slot: int | None = None
    ) -> list[TargetFacts]:
        """Writes ``adapter`` into ``row`` (a [width] tensor: a host row, or a slot of ``storage``) as
        its slot holds it; every element ends as the slot needs it, modules it does not target get zeros
        (None: an empty slot). ``slot``: ``row`` is that slot of ``storage`` with its committed facts
        current, so only what its occupant wrote is cleared (mostly a few rank blocks of a few targets,
        instead of the whole row: a slot fill's main cost)."""
        modules = {}
        if adapter is not None:
            self.lora.check_fits(adapter)
            modules = adapter.modules
        facts = []
        try:
            for i, target in enumerate(self._targets):
                view = self._views(row, i)
                clear_view(view, *(target.written_extent(slot) if slot is not None else (None, True)))
                facts.append([
                    write_member(view, target.slices[j], j, target.max_rank, name, modules.get(name),
                                 self._base_bias[name], cleared=True)
                    for j, name in enumerate(target.names)
                ])  # fmt: skip
        except BaseException:
            if slot is not None:  # the committed facts no longer describe the row: leave it empty
                for i in range(len(self._targets)):
                    clear_view(self._views(row, i))
            raise
        return facts

    def commit(self, slot: int, facts: list[TargetFacts]) -> None:
        """Records what ``slot`` now holds (engine thread: the forward reads these facts)."""
        for target, target_facts in zip(self._targets, facts, strict=True):
            target.set_facts(slot, target_facts)

    def any_host_pass(self) -> bool:
        """Whether a resident slot holds DoRA or lora_bias weights (passes that loop on the host)."""
        return any(target.resident_host_pass for target in self._targets)

    def clear(self, slot: int) -> None:
        """Empties ``slot`` whole (rare: unloads, failed fills; not relying on its recorded facts)."""
        self.commit(slot, self.pack(None, self.storage[slot]))
