"""Every LoRA target's pages as views of one ``[pages + 1, page_row]`` tensor, and its per-slot vectors
as views of one ``[slots, vector_row]`` tensor: one page of the whole model - one rank block of an
adapter, in every layer - is one contiguous row, and so is a slot's bias and DoRA vectors.

An adapter takes as many pages as its rank needs (``slot_weights.blocks_for``; the slot table hands
them out, the page table maps its slot to them) and its slot's vector row. Its rows are packed on
the host, off the engine thread when it is prefetched (the rank blocking, transposes and scale
folding all happen there): on the CPU straight into its pages (no second copy), clearing only what
their previous owners wrote; on CUDA into contiguous pinned staging rows, landed with one
host-to-device copy and scattered to its pages on the device (``slot_fill.py``). The kernels see
``a``/``b`` pages with a larger page stride.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.lora.adapter import LoRAAdapter
from server.lora.layers import LoRAModel
from server.lora.slot_weights import (
    PAGE_BUFFERS,
    RANK_BLOCK,
    VECTOR_BUFFERS,
    MemberFacts,
    PageTable,
    SlotView,
    SlotWeights,
    blocks_for,
    write_member,
)

TargetFacts = list[MemberFacts]  # one entry per member of a target
CACHE_LINE = 64  # bytes


@dataclass(frozen=True)
class Staging:
    """Host rows an adapter is packed into before its copy to the device (pinned on CUDA): its vector
    row, then its page rows, so that what an adapter fills is one contiguous prefix of ``flat``."""

    flat: torch.Tensor  # [vector_row + max_rank / 16 * page_row]
    vector: torch.Tensor  # [vector_row], a view of flat
    pages: torch.Tensor  # [max_rank / 16, page_row], a view of flat


class RowLayout:
    """Where each target's buffers sit in a row: ``views(rows, target)`` -> name -> view of ``rows``
    [..., width], with the leading dims of ``rows``. Each buffer starts on a multiple of ``align``
    elements (and so does each row): a member's 16 ranks of an A row then fill whole cache lines,
    which the kernel skips for members a slot does not target."""

    def __init__(self, names: Sequence[str], shapes: list[list[torch.Size]], align: int) -> None:
        self.names = names
        self._parts: list[list[tuple[int, torch.Size]]] = []
        width = 0
        for target_shapes in shapes:
            part = []
            for shape in target_shapes:
                part.append((width, shape))
                width += -(-shape.numel() // align) * align
            self._parts.append(part)
        self.width = width

    def views(self, rows: torch.Tensor, target: int) -> dict[str, torch.Tensor]:
        lead = rows.shape[:-1]
        return {
            name: rows[..., offset : offset + shape.numel()].view(*lead, *shape)
            for name, (offset, shape) in zip(self.names, self._parts[target], strict=True)
        }

    def row_views(self, row: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Every target's views of one row."""
        return [self.views(row, i) for i in range(len(self._parts))]


class SlotRows:
    """Lays the pages and vectors of freshly injected, paged targets (all empty) out as rows of
    ``pages`` and ``vectors``, and packs adapters into them.

    The targets' own buffers are released before the rows are allocated, so the slots never take
    twice their memory, even briefly. Which pages may hold non-zeros is tracked per page and target
    (``_written``), so a fill in place clears only those.
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
        self.num_slots = lora.max_loras
        self.table = PageTable(self.num_slots, blocks_for(lora.max_rank), lora.num_pages, self.device)
        shapes = [target.release() for target in self._targets]
        align = CACHE_LINE // first.element_size()
        self._page_layout = RowLayout(PAGE_BUFFERS, [s[0] for s in shapes], align)
        self._vector_layout = RowLayout(VECTOR_BUFFERS, [s[1] for s in shapes], align)
        kw = {"device": self.device, "dtype": self.dtype}
        self.pages = torch.zeros(self.table.num_pages + 1, self._page_layout.width, **kw)  # + the zero page
        self.vectors = torch.zeros(self.num_slots, self._vector_layout.width, **kw)
        # Base biases on the host, once: packing runs on loader threads and must not touch the device.
        self._base_bias = {
            name: None if layer.base_layer.bias is None else layer.base_layer.bias.detach().float().cpu()
            for name, layer in lora.layers.items()
        }
        for i, target in enumerate(self._targets):
            views = {**self._page_layout.views(self.pages, i), **self._vector_layout.views(self.vectors, i)}
            target.bind(views, self.table)
        # Every page's and slot's views, made once: a fill made them anew in ~0.5 ms.
        self._page_views = [self._page_layout.row_views(row) for row in self.pages[:-1]]
        self._vector_views = [self._vector_layout.row_views(row) for row in self.vectors]
        self._written: list[frozenset[int]] = [frozenset()] * self.table.num_pages  # targets, per page
        self._vectors_written: list[frozenset[int]] = [frozenset()] * self.num_slots

    @property
    def num_pages(self) -> int:
        return self.table.num_pages

    def new_staging(self, pin_memory: bool = False) -> Staging:
        """Host rows to pack an adapter of any rank into (pinned: asynchronous copies to CUDA)."""
        vector, page = self._vector_layout.width, self._page_layout.width
        flat = torch.empty(vector + self.table.blocks * page, dtype=self.dtype, pin_memory=pin_memory)
        return Staging(flat, flat[:vector], flat[vector:].view(self.table.blocks, page))

    def fill_in_place(self, adapter: LoRAAdapter, slot: int, pages: Sequence[int]) -> list[TargetFacts]:
        """Packs ``adapter`` straight into ``pages`` and ``slot``'s vector row (the device is the host),
        clearing only what was written there before. The caller owns them: nothing reads them now."""
        views = [self._page_views[p] for p in pages]
        stale = [self._written[p] for p in pages]
        try:
            facts = self._write(adapter, views, self._vector_views[slot], stale, self._vectors_written[slot])
        except BaseException:  # what was written is unknown: leave the rows empty
            for p in pages:
                self.pages[p].zero_()
            self.vectors[slot].zero_()
            self._record_written(slot, pages, None)
            raise
        self._record_written(slot, pages, facts)
        return facts

    def pack_staged(self, adapter: LoRAAdapter, slot: int, pages: Sequence[int], staging: Staging):
        """Packs ``adapter`` into ``staging`` whole (its first ``len(pages)`` page rows and its vector
        row), to be copied into ``pages`` and ``slot`` by ``copy_in``."""
        rows = staging.pages[: len(pages)]
        rows.zero_()
        staging.vector.zero_()
        views = [self._page_layout.row_views(row) for row in rows]
        facts = self._write(adapter, views, self._vector_layout.row_views(staging.vector), None, None)
        self._record_written(slot, pages, facts)  # what the copy leaves there
        return facts

    def copy_in(self, slot: int, pages: Sequence[int], staging: Staging) -> None:
        """Copies packed ``staging`` into ``pages`` and ``slot``'s vector row (on the current stream):
        one host-to-device copy of the adapter's contiguous rows, then on-device copies to its pages."""
        vector, page = self._vector_layout.width, self._page_layout.width
        landed = staging.flat[: vector + len(pages) * page].to(self.device, non_blocking=True)
        self.vectors[slot].copy_(landed[:vector])
        for k, p in enumerate(pages):
            self.pages[p].copy_(landed[vector + k * page : vector + (k + 1) * page])

    @torch.no_grad()
    def _write(self, adapter: LoRAAdapter | None, pages: list[list[dict[str, torch.Tensor]]],
               vectors: list[dict[str, torch.Tensor]], stale: list[frozenset[int]] | None,
               stale_vectors: frozenset[int] | None) -> list[TargetFacts]:  # fmt: skip
        """Writes ``adapter`` (None: nothing) through ``pages`` (per page, every target's views) and
        ``vectors`` (every target's) into rows that hold zeros except, per target, the pages ``stale``
        names and the vectors ``stale_vectors`` names (cleared first); modules it does not target
        stay zero."""
        modules = {}
        if adapter is not None:
            self.lora.check_fits(adapter)
            modules = adapter.modules
        facts = []
        for i, target in enumerate(self._targets):
            stale_pages = [k for k, targets in enumerate(stale or ()) if i in targets]
            clear_vectors = bool(stale_vectors and i in stale_vectors)
            if not stale_pages and not clear_vectors and not any(name in modules for name in target.names):
                facts.append([MemberFacts()] * target.num_members)  # zeros stay zeros: nothing to do
                continue
            view = SlotView([p[i]["a"] for p in pages], [p[i]["b"] for p in pages], **vectors[i])
            for k in stale_pages:
                view.a[k].zero_()
                view.b[k].zero_()
            if clear_vectors:
                for vector in vectors[i].values():
                    vector.zero_()
            facts.append([
                write_member(view, target.slices[j], j, target.max_rank, name, modules.get(name),
                             self._base_bias[name], cleared=True)
                for j, name in enumerate(target.names)
            ])  # fmt: skip
        return facts

    def _record_written(self, slot: int, pages: Sequence[int], facts: list[TargetFacts] | None) -> None:
        """Which targets' blocks of ``pages`` and vectors of ``slot`` hold non-zeros per ``facts``."""
        facts = facts or [[] for _ in self._targets]
        blocks = [-(-max((f.rank for f in fs), default=0) // RANK_BLOCK) for fs in facts]
        for k, page in enumerate(pages):
            self._written[page] = frozenset(i for i, n in enumerate(blocks) if k < n)
        self._vectors_written[slot] = frozenset(
            i for i, fs in enumerate(facts) if any(f.has_bias or f.is_dora for f in fs)
        )

    def commit(self, slot: int, pages: Sequence[int], facts: list[TargetFacts]) -> None:
        """``slot`` serves from ``pages`` what ``facts`` describe (engine thread: the forward reads these)."""
        self.table.map(slot, pages)
        for target, target_facts in zip(self._targets, facts, strict=True):
            target.set_facts(slot, target_facts)

    def release(self, slot: int) -> None:
        """``slot`` serves nothing (its pages are free: a later fill clears what they hold)."""
        self.commit(slot, [], [[MemberFacts()] * t.num_members for t in self._targets])

    def any_host_pass(self) -> bool:
        """Whether a resident slot holds DoRA or lora_bias weights (passes that loop on the host)."""
        return any(target.resident_host_pass for target in self._targets)
