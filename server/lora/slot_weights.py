"""The slot weights of one LoRA target: every resident adapter's A and B (and DoRA, bias), in pages.

A target is one linear, or a fused group of sibling linears that read the same input (q/k/v,
gate/up: ``server.model.fused_linear``); then one op serves every member, and each member keeps its
own PEFT name and rank but writes into the shared buffers.

A and B live in **pages** of one rank block (16 ranks) each, and a slot - one resident adapter - owns
as many pages as its rank needs (S-LoRA's unified paging, by rank): the page table maps slot ``s``'s
rank block ``k`` to a page, so the same memory holds twice as many rank-32 adapters as rank-64 ones,
and an adapter never waits for a slot because a large one sized every slot. Per page:

* ``a [pages, in, members, 16]``: member j's A (pre-transposed, ``[in, r]``), ranks ``16k..16k+15``
  of the slot's block k. A rank block of the whole group is one contiguous ``[in, members * 16]``
  matrix: the shrink runs once for the group, over only the slot's own rank blocks, streaming
  contiguous memory; each member's 16 ranks of an input row are one 64-byte line (fp32), so a member
  the adapter does not target (k of a q/v adapter: PEFT's default) is skipped, not read.
* ``b [pages, 16, sum(out)]``: member j's B (pre-transposed, ``[r, out_j]``) rows of that block, in
  its column slice.

Per slot (not paged: one vector each): ``bias``, and DoRA's ``dora_gain = g - 1`` and ``dora_shift``
(``y = g * (W x) + b0``; kept as g - 1 so a half-precision slot rounds the small change, not the
whole base output), all ``[slots, sum(out)]`` and zero where a slot has none, so they apply to whole
rows without looking at which member a column belongs to.

Pre-transposed, both operands are row-major ("NN" GEMMs, measured ~30% faster than PEFT's
``[r, in]`` / ``[out, r]`` for the small CPU matmuls of decode). Ranks past a member's own are zero,
so adapters of any rank share the buffers. The adapter scale and DoRA's per-row rescale are folded
into ``b`` when a slot is written. The page table's unused entries name the **zero page** (the last
page, never written): a step that reads every block of a slot (a captured graph's fixed launches)
adds exactly zero for blocks the slot does not own.

The slots' dtype is the model's, or half width under a float32 model (``Settings.lora_dtype``): the
weights are scaled in fp32 and rounded once when written; the ops widen them and compute in fp32.

Standalone (tests, tools), slot ``s`` owns pages ``s * blocks + k`` (every slot at ``max_rank``). The
server lays every target's pages out as rows of one tensor and hands pages out as adapters come and
go (``slot_rows.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from server.lora.adapter import LoRAModuleWeights
from server.lora.errors import AdapterError

RANK_BLOCK = 16  # ranks per page; live ranks round up to it
PAGE_BUFFERS = ("a", "b")  # one rank block of each, per page, in page-row order
VECTOR_BUFFERS = ("bias", "dora_gain", "dora_shift")  # one vector each, per slot, in vector-row order


def blocks_for(rank: int) -> int:
    """Rank blocks (pages) that ``rank`` ranks take; at least one, so every resident adapter owns a page."""
    return max(1, -(-rank // RANK_BLOCK))


class PageTable:
    """Which page holds each slot's rank block: ``tensor`` [slots, blocks] int64 on the device (the
    kernels read it), ``host`` the same as lists (Python reads it without touching the device). Entries
    a slot does not own name ``zero_page``, the page past the ``num_pages`` that hold weights."""

    def __init__(self, num_slots: int, blocks: int, num_pages: int | None, device) -> None:
        """``num_pages`` None: slot ``s`` owns pages ``s * blocks + k`` (standalone); else none owns any."""
        self.blocks = blocks
        identity = num_pages is None
        self.num_pages = num_slots * blocks if identity else num_pages
        self.zero_page = self.num_pages
        self.host = [
            [s * blocks + k for k in range(blocks)] if identity else [self.zero_page] * blocks
            for s in range(num_slots)
        ]
        self.tensor = torch.tensor(self.host, dtype=torch.long, device=device)

    def pages_of(self, slot: int) -> list[int]:
        return [p for p in self.host[slot] if p != self.zero_page]

    def map(self, slot: int, pages: Sequence[int]) -> None:
        """Slot ``slot`` owns ``pages`` (its rank blocks in order) from now; engine thread."""
        if len(pages) > self.blocks or not all(0 <= p < self.num_pages for p in pages):
            raise ValueError(f"slot {slot}: pages {list(pages)} (at most {self.blocks} of {self.num_pages})")
        row = list(pages) + [self.zero_page] * (self.blocks - len(pages))
        self.host[slot] = row
        self.tensor[slot] = torch.tensor(row, dtype=torch.long)


@dataclass(frozen=True)
class SlotView:
    """One slot of one target: its pages' blocks, ``a[k]`` [in, members, 16] and ``b[k]`` [16, sum(out)]
    (ranks ``16k..16k+15``), and its vectors [sum(out)]."""

    a: Sequence[torch.Tensor]
    b: Sequence[torch.Tensor]
    bias: torch.Tensor
    dora_gain: torch.Tensor
    dora_shift: torch.Tensor


@dataclass(frozen=True)
class MemberFacts:
    """What one member's part of a slot holds, kept on the host so the forward can skip passes."""

    rank: int = 0
    has_bias: bool = False
    is_dora: bool = False


@torch.no_grad()
def write_member(view: SlotView, cols: slice, member: int, max_rank: int, name: str,
                 weights: LoRAModuleWeights | None, base_bias: torch.Tensor | None,
                 cleared: bool = False) -> MemberFacts:  # fmt: skip
    """Writes one module's adapter weights (None: zeros) into its member part of ``view``, columns
    ``cols`` of the group; ``cleared``: the view was just cleared, so only the weights are written."""
    if not cleared:
        for a, b in zip(view.a, view.b, strict=True):
            a[:, member].zero_()
            b[:, cols].zero_()
        for vector in (view.bias, view.dora_gain, view.dora_shift):
            vector[cols].zero_()
    if weights is None:
        return MemberFacts()
    r = weights.rank
    if r > max_rank:
        raise AdapterError(f"module '{name}': rank {r} exceeds max_lora_rank={max_rank}")
    if blocks_for(r) > len(view.a):
        raise AdapterError(
            f"module '{name}': rank {r} needs {blocks_for(r)} pages, its slot has {len(view.a)}"
        )
    stored = stored_values(weights, base_bias)
    if stored.dora_gain is not None:
        view.dora_gain[cols].copy_(stored.dora_gain)
        view.dora_shift[cols].copy_(stored.dora_shift)
    a_t, b_t = weights.a.t(), stored.b.t()  # [in, r], [r, out]
    for block in range(-(-r // RANK_BLOCK)):
        ranks = slice(block * RANK_BLOCK, (block + 1) * RANK_BLOCK)
        width = a_t[:, ranks].shape[1]
        view.a[block][:, member, :width].copy_(a_t[:, ranks])
        view.b[block][:width, cols].copy_(b_t[ranks])
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
    """The paged weights of one target (one linear or a fused group), plus host-side per-slot facts
    read every forward (without touching the device) to skip passes no slot needs."""

    def __init__(self, names: Sequence[str], in_features: int, out_features: Sequence[int], num_slots: int,
                 max_rank: int, device, dtype, num_pages: int | None = None) -> None:  # fmt: skip
        """``num_pages`` None: every slot owns its ``max_rank`` pages (standalone); else that many pages,
        handed out by whoever lays the slots out (``SlotRows``), none owned yet."""
        super().__init__()
        self.names = list(names)
        self.max_rank = max_rank
        self.num_slots = num_slots
        bounds = [0]
        for n in out_features:
            bounds.append(bounds[-1] + n)
        self.slices = [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]
        self.table = PageTable(num_slots, blocks_for(max_rank), num_pages, device)
        kw = {"device": device, "dtype": dtype}
        members, width, pages = len(self.names), bounds[-1], self.table.num_pages + 1  # + the zero page
        self.register_buffer(
            "a", torch.zeros(pages, in_features, members, RANK_BLOCK, **kw), persistent=False
        )
        self.register_buffer("b", torch.zeros(pages, RANK_BLOCK, width, **kw), persistent=False)
        for name in VECTOR_BUFFERS:
            self.register_buffer(name, torch.zeros(num_slots, width, **kw), persistent=False)
        self.rank = [[0] * num_slots for _ in self.names]  # [member][slot]
        self._bias = [[False] * num_slots for _ in self.names]
        self._dora = [[False] * num_slots for _ in self.names]
        self._kernel_facts = [(0, 0)] * num_slots  # host copies of slot_rank, slot_members
        for name in ("slot_rank", "slot_members"):
            self.register_buffer(
                name, torch.zeros(num_slots, dtype=torch.long, device=device), persistent=False
            )
        self.rank_mask = self.dora_mask = self.bias_mask = 0
        self._refresh_resident(range(num_slots))

    @property
    def num_members(self) -> int:
        return len(self.names)

    @property
    def page_table(self) -> torch.Tensor:
        """[slots, max_rank / 16] int64: the page of each slot's rank block (the zero page if none)."""
        return self.table.tensor

    def kernel_args(self) -> tuple:
        """``(a, b, column bounds, page_table, slot_rank, slot_members)``, what every native op call passes,
        kept as one tuple: reading four buffers through nn.Module's attribute lookup and rebuilding the
        bounds took ~2.5 us of a ~6 us call (32 calls a decode step). Rebuilt when a buffer or the page
        table is replaced (``bind``, ``release``, ``Module.to``)."""
        args = self.__dict__.get("_kernel_args")
        buffers = self._buffers
        if (
            args is None
            or args[0] is not buffers["a"]
            or args[1] is not buffers["b"]
            or args[3] is not self.table.tensor
            or args[4] is not buffers["slot_rank"]
            or args[5] is not buffers["slot_members"]
        ):
            bounds = [cols.start for cols in self.slices] + [self.slices[-1].stop]
            args = (buffers["a"], buffers["b"], bounds, self.table.tensor, buffers["slot_rank"],
                    buffers["slot_members"])  # fmt: skip
            self.__dict__["_kernel_args"] = args
        return args

    def live_rank(self, slots: Iterable[int]) -> int:
        """The rank the op needs for these slots: the largest live one, rounded up to RANK_BLOCK."""
        r = max((ranks[s] for ranks in self.rank for s in slots), default=0)
        return -(-r // RANK_BLOCK) * RANK_BLOCK

    def _refresh_resident(self, slots: Iterable[int]) -> None:
        """Facts over every slot, kept as plain attributes: a compiled (static) step reads them as
        constants or tensors it reads each step: ``slot_rank`` (each slot's rank over its members,
        rounded up to ``RANK_BLOCK``: the native kernel's per-slot rank) and ``slot_members`` (bit j:
        member j has a rank in the slot; the kernel skips the others' weights), the slot bit masks
        ``rank_mask``, ``dora_mask`` and ``bias_mask`` (an eager step skips each pass no live slot
        needs), and ``resident_host_pass``, whether a slot needs the DoRA or lora_bias pass (then no
        static step runs). Rewritten for ``slots``, the ones that changed (a fill commits every target:
        recomputing all slots' bits took ~20 us a target, 0.6 ms a fill on the engine thread)."""
        masks = [self.rank_mask, self.dora_mask, self.bias_mask]
        for slot in slots:
            kernel_facts = (
                self.live_rank([slot]),
                sum(1 << j for j, ranks in enumerate(self.rank) if ranks[slot]),
            )
            if kernel_facts != self._kernel_facts[slot]:  # a tensor write costs ~5 us; most are unchanged
                self._kernel_facts[slot] = kernel_facts
                self.slot_rank[slot], self.slot_members[slot] = kernel_facts
            for i, per_member in enumerate((self.rank, self._dora, self._bias)):
                masks[i] = _with_bit(masks[i], slot, any(member[slot] for member in per_member))
        # Plain attributes, set past nn.Module.__setattr__ (its checks cost more than the rest here).
        self.__dict__.update(  # bit s: slot s has a rank > 0, DoRA, a bias
            rank_mask=masks[0],
            dora_mask=masks[1],
            bias_mask=masks[2],
            resident_host_pass=bool(masks[1] or masks[2]),
        )

    def view(self, slot: int) -> SlotView:
        """``slot``'s blocks in the pages the table maps it to, and its vectors."""
        pages = self.table.pages_of(slot)
        vectors = (getattr(self, name)[slot] for name in VECTOR_BUFFERS)
        return SlotView([self.a[p] for p in pages], [self.b[p] for p in pages], *vectors)

    def set_facts(self, slot: int, facts: Sequence[MemberFacts]) -> None:
        """Records what ``slot`` holds, one entry per member (engine thread: the forward reads these)."""
        for member, f in enumerate(facts):
            self._record(slot, member, f)
        self._refresh_resident([slot])

    def _record(self, slot: int, member: int, f: MemberFacts) -> None:
        self.rank[member][slot] = f.rank
        self._bias[member][slot] = f.has_bias
        self._dora[member][slot] = f.is_dora

    def release(self) -> tuple[list[torch.Size], list[torch.Size]]:
        """Frees the buffers, to be replaced by ``bind``; returns one page's shape of each paged buffer,
        and one slot's of each vector."""
        shapes: tuple[list[torch.Size], list[torch.Size]] = ([], [])
        for part, names in zip(shapes, (PAGE_BUFFERS, VECTOR_BUFFERS), strict=True):
            for name in names:
                old = getattr(self, name)
                part.append(old.shape[1:])
                setattr(self, name, old.new_empty(0))
        return shapes

    def bind(self, buffers: dict[str, torch.Tensor], table: PageTable) -> None:
        """Serves from ``buffers`` (every name of PAGE_BUFFERS and VECTOR_BUFFERS: views of the same
        per-page and per-slot shapes, e.g. into one tensor shared by all targets) through ``table``."""
        for name in (*PAGE_BUFFERS, *VECTOR_BUFFERS):
            setattr(self, name, buffers[name])
        self.table = table

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
