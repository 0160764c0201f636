"""The slot weights of one LoRA target: every resident adapter's A and B (and DoRA, bias), stacked.

A target is one linear, or a fused group of sibling linears that read the same input (q/k/v,
gate/up: ``server.model.fused_linear``); then one op serves every member, and each member keeps its
own PEFT name and rank but writes into the shared buffers:

* ``a [max_loras, R / 16, in, 16, members]``: member j's A (pre-transposed, ``[in, r]``) in blocks of
  16 ranks, each block ``[in, 16 ranks, members]``. Rank-major, member-minor, so a rank block of the
  whole group is one contiguous ``[in, 16 * members]`` matrix: the shrink runs once for the group,
  over only the step's live rank blocks (no padding to ``max_lora_rank``), streaming contiguous
  memory (a step's adapter weights come from DRAM; with the rank padded inside each row instead,
  the decode step measured ~8% slower at ``max_lora_rank=64`` and rank-16 adapters).
* ``b [max_loras, R, sum(out)]``: member j's B (pre-transposed, ``[r, out_j]``) is its column slice.

Pre-transposed, both operands are row-major ("NN" GEMMs, measured ~30% faster than PEFT's
``[r, in]`` / ``[out, r]`` for the small CPU matmuls of decode). ``R`` is ``max_rank`` rounded up to
``RANK_BLOCK``; unused ranks are zero, so adapters of any rank share the buffers. The adapter scale and DoRA's per-row rescale are folded into ``b``
when a slot is written; DoRA also rescales its rows' base output (``y = g * (W x) + b0``) with two
per-slot vectors, ``dora_gain = g - 1`` and ``dora_shift`` (both 0 where a slot has no DoRA: kept as
g - 1, a half-precision slot rounds the small change, not the whole base output), and ``bias`` is
zero where a slot has none, so all apply to whole rows without looking at which member a column
belongs to.

The slots' dtype is the model's, or half width under a float32 model (``Settings.lora_dtype``): the
weights are scaled in fp32 and rounded once when written; the ops widen them and compute in fp32.

The buffers may be views into one ``[max_loras, row]`` tensor shared by every target
(``slot_rows.py``), so that one slot of the whole model is one contiguous row; ``write_member`` fills
one slot's views wherever they live: the device buffers, or a host row copied there in one piece.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from server.lora.adapter import LoRAModuleWeights
from server.lora.errors import AdapterError

RANK_BLOCK = 16  # ranks per block of ``a``; live ranks round up to it
BUFFERS = ("a", "b", "bias", "dora_gain", "dora_shift")  # the per-slot buffers, in row order


@dataclass(frozen=True)
class SlotView:
    """One slot of one target: ``a`` [R/16, in, 16, members], ``b`` [R, sum(out)], the rest [sum(out)]."""

    a: torch.Tensor
    b: torch.Tensor
    bias: torch.Tensor
    dora_gain: torch.Tensor
    dora_shift: torch.Tensor


@dataclass(frozen=True)
class MemberFacts:
    """What one member's part of a slot holds, kept on the host so the forward can skip passes."""

    rank: int = 0
    has_bias: bool = False
    is_dora: bool = False


def clear_view(view: SlotView, rank: int | None = None, extras: bool = True) -> None:
    """An empty slot: a padded kernel adds exactly nothing for it. ``rank``: only the first ``rank``
    ranks can be non-zero (the rest is cleared already); ``extras``: whether bias/DoRA may be set."""
    if rank is None:
        view.a.zero_()
        view.b.zero_()
    elif rank:
        view.a[: -(-rank // RANK_BLOCK)].zero_()
        view.b[:rank].zero_()
    if extras:
        view.bias.zero_()
        view.dora_gain.zero_()
        view.dora_shift.zero_()


@torch.no_grad()
def write_member(view: SlotView, cols: slice, member: int, max_rank: int, name: str,
                 weights: LoRAModuleWeights | None, base_bias: torch.Tensor | None,
                 cleared: bool = False) -> MemberFacts:  # fmt: skip
    """Writes one module's adapter weights (None: zeros) into its member part of ``view``, columns
    ``cols`` of the group; ``cleared``: the view was just cleared, so only the weights are written."""
    if not cleared:
        view.a[..., member].zero_()
        view.b[:, cols].zero_()
        view.bias[cols].zero_()
        view.dora_gain[cols].zero_()
        view.dora_shift[cols].zero_()
    if weights is None:
        return MemberFacts()
    r = weights.rank
    if r > max_rank:
        raise AdapterError(f"module '{name}': rank {r} exceeds max_lora_rank={max_rank}")
    stored = stored_values(weights, base_bias)
    if stored.dora_gain is not None:
        view.dora_gain[cols].copy_(stored.dora_gain)
        view.dora_shift[cols].copy_(stored.dora_shift)
    a_t = weights.a.t()  # [in, r]
    for block in range(-(-r // RANK_BLOCK)):
        ranks = a_t[:, block * RANK_BLOCK : (block + 1) * RANK_BLOCK]
        view.a[block, :, : ranks.shape[1], member].copy_(ranks)
    view.b[:r, cols].copy_(stored.b.t())
    if stored.bias is not None:
        view.bias[cols].copy_(stored.bias)
    return MemberFacts(r, weights.bias is not None, weights.dora_g is not None)


@dataclass(frozen=True)
class StoredValues:
    """What a slot holds for one module besides A (stored as given), in fp32 before the slot's dtype
    rounds it: B and the bias scaled by the adapter scale (and DoRA's per-row rescale), and DoRA's
    ``g - 1`` and shift."""

    b: torch.Tensor  # [out, r]
    bias: torch.Tensor | None
    dora_gain: torch.Tensor | None
    dora_shift: torch.Tensor | None


def stored_values(weights: LoRAModuleWeights, base_bias: torch.Tensor | None) -> StoredValues:
    row_scale = torch.full((weights.b.shape[0],), weights.scale, dtype=torch.float32)
    gain = shift = None
    if weights.dora_g is not None:
        row_scale = row_scale * weights.dora_g
        gain = weights.dora_g - 1
        shift = torch.zeros_like(weights.dora_g) if base_bias is None else -gain * base_bias.float().cpu()
    bias = None if weights.bias is None else weights.bias * row_scale
    return StoredValues(weights.b * row_scale[:, None], bias, gain, shift)


def largest_stored_value(weights: LoRAModuleWeights, base_bias: torch.Tensor | None) -> float:
    """The largest magnitude a slot would hold for ``weights``: float16 slots hold at most 65504, so an
    adapter past it is refused when read (an inf would poison every row using it)."""
    stored = stored_values(weights, base_bias)
    parts = (weights.a, stored.b, stored.bias, stored.dora_gain, stored.dora_shift)
    return max(float(t.abs().amax()) for t in parts if t is not None)


def _with_bit(mask: int, bit: int, value: bool) -> int:
    return mask | (1 << bit) if value else mask & ~(1 << bit)


class SlotWeights(nn.Module):
    """The stacked weights of one target (one linear or a fused group), plus host-side per-slot facts
    read every forward (without touching the device) to skip passes no slot needs."""

    def __init__(self, names: Sequence[str], in_features: int, out_features: Sequence[int], max_loras: int,
                 max_rank: int, device, dtype) -> None:  # fmt: skip
        super().__init__()
        self.names = list(names)
        self.max_rank = max_rank
        bounds = [0]
        for n in out_features:
            bounds.append(bounds[-1] + n)
        self.slices = [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]
        blocks = -(-max_rank // RANK_BLOCK)
        kw = {"device": device, "dtype": dtype}
        members, width = len(self.names), bounds[-1]
        a = torch.zeros(max_loras, blocks, in_features, RANK_BLOCK, members, **kw)
        self.register_buffer("a", a, persistent=False)
        self.register_buffer("b", torch.zeros(max_loras, blocks * RANK_BLOCK, width, **kw), persistent=False)
        self.register_buffer("bias", torch.zeros(max_loras, width, **kw), persistent=False)
        self.register_buffer("dora_gain", torch.zeros(max_loras, width, **kw), persistent=False)
        self.register_buffer("dora_shift", torch.zeros(max_loras, width, **kw), persistent=False)
        self.rank = [[0] * max_loras for _ in self.names]  # [member][slot]
        self._bias = [[False] * max_loras for _ in self.names]
        self._dora = [[False] * max_loras for _ in self.names]
        self.register_buffer(
            "slot_rank", torch.zeros(max_loras, dtype=torch.long, device=device), persistent=False
        )
        self.rank_mask = self.dora_mask = self.bias_mask = 0
        self._refresh_resident(range(max_loras))

    @property
    def num_members(self) -> int:
        return len(self.names)

    def live_rank(self, slots: Iterable[int]) -> int:
        """The rank the op needs for these slots: the largest live one, rounded up to RANK_BLOCK."""
        r = max((ranks[s] for ranks in self.rank for s in slots), default=0)
        return -(-r // RANK_BLOCK) * RANK_BLOCK

    def _refresh_resident(self, slots: Iterable[int]) -> None:
        """Facts over every slot, kept as plain attributes: a compiled (static) step reads them as
        constants or tensors it reads each step: ``slot_rank`` (each slot's rank over its members,
        rounded up to ``RANK_BLOCK``: the native kernel's per-slot rank), the slot bit masks
        ``rank_mask``, ``dora_mask`` and ``bias_mask`` (an eager step skips each pass no live slot
        needs), and ``resident_host_pass``, whether a slot needs the DoRA or lora_bias pass (then no
        static step runs). Rewritten for ``slots``, the ones that changed (a fill commits every target:
        recomputing all slots' bits took ~20 us a target, 0.6 ms a fill on the engine thread)."""
        masks = [self.rank_mask, self.dora_mask, self.bias_mask]
        for slot in slots:
            self.slot_rank[slot] = self.live_rank([slot])
            for i, per_member in enumerate((self.rank, self._dora, self._bias)):
                masks[i] = _with_bit(masks[i], slot, any(member[slot] for member in per_member))
        self.rank_mask, self.dora_mask, self.bias_mask = masks  # bit s: slot s has a rank > 0, DoRA, a bias
        self.resident_host_pass = bool(self.dora_mask or self.bias_mask)

    def written_extent(self, slot: int) -> tuple[int, bool]:
        """What ``slot`` may hold beyond zeros: its live rank, and whether it has bias or DoRA vectors."""
        return self.live_rank([slot]), bool((self.dora_mask | self.bias_mask) >> slot & 1)

    def view(self, slot: int) -> SlotView:
        return SlotView(*(getattr(self, name)[slot] for name in BUFFERS))

    def set_facts(self, slot: int, facts: Sequence[MemberFacts]) -> None:
        """Records what ``slot`` holds, one entry per member (engine thread: the forward reads these)."""
        for member, f in enumerate(facts):
            self._record(slot, member, f)
        self._refresh_resident([slot])

    def _record(self, slot: int, member: int, f: MemberFacts) -> None:
        self.rank[member][slot] = f.rank
        self._bias[member][slot] = f.has_bias
        self._dora[member][slot] = f.is_dora

    def release(self) -> list[torch.Size]:
        """Frees the slot buffers, to be replaced by ``bind``; returns one slot's shape of each."""
        shapes = []
        for name in BUFFERS:
            old = getattr(self, name)
            shapes.append(old.shape[1:])
            setattr(self, name, old.new_empty(0))
        return shapes

    def bind(self, stacked: SlotView) -> None:
        """Serves from ``stacked``: views of the same shapes (e.g. into one tensor shared by all targets)."""
        for name in BUFFERS:
            setattr(self, name, getattr(stacked, name))

    def write(self, slot: int, member: int, weights: LoRAModuleWeights | None,
              base_bias: torch.Tensor | None) -> None:  # fmt: skip
        """Copies one module's adapter weights into ``slot`` (None: the adapter leaves it alone)."""
        facts = write_member(self.view(slot), self.slices[member], member, self.max_rank, self.names[member],
                             weights, base_bias)  # fmt: skip
        self._record(slot, member, facts)
        self._refresh_resident([slot])

    def clear(self, slot: int, member: int) -> None:
        """Zeros one member's part of the slot so a padded kernel adds exactly nothing for it."""
        self.write(slot, member, None, None)
