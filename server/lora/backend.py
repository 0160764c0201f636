"""The mixed-batch LoRA compute path as one object per process (like vLLM's punica wrapper).

A backend owns the step's batch metadata (``LoRABatch``: which rows use which slot), built once per
step by ``plan`` and shared by every LoRA layer, and the shrink/expand op. Every LoRA target (a
wrapped linear, or a fused q/k/v or gate/up group) calls ``apply(y, x, slot_weights)`` after its base
matmul. ``torch`` is the reference (correct everywhere); ``cpu`` is a native kernel, one call per
target (built for the host CPU at start-up); ``triton`` runs SGMV kernels (CUDA, or the Triton
interpreter with ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.lora.batch import LoRABatch
from server.lora.ops.sgmv_cpu import sgmv_cpu, sgmv_cpu_rows  # not per call: ~0.5 us of each
from server.lora.slot_weights import RANK_BLOCK, SlotWeights
from server.triton_support import triton_unavailable


class LoRABackend:
    """``plan`` once per step, ``apply`` per layer; subclasses provide ``sgmv``."""

    name = "abstract"
    # Whether a static (padded decode) batch runs as fixed launches reading only the segment table,
    # so a CUDA graph can replay it (the DoRA and lora_bias passes never are: they loop on the host).
    capturable = False

    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self.batch = LoRABatch(max_loras)

    def plan(self, seq_slots: Sequence[int], seq_num_tokens: Sequence[int], static: bool = False) -> None:
        """Sequence i occupies the next ``seq_num_tokens[i]`` rows and uses slot ``seq_slots[i]`` (-1: none);
        ``static``: a decode step padded to a graph bucket (see ``LoRABatch.set``)."""
        self.batch.set(seq_slots, seq_num_tokens, static)

    def clear(self) -> None:
        """No batch: every row runs the base model (e.g. a plain forward outside the engine)."""
        self.batch.clear()

    @property
    def active(self) -> bool:
        """Whether the current batch may add any delta. A static step of a capturable backend always
        runs its op (a compiled graph must not depend on which rows have adapters this step)."""
        return (self.batch.static and self.capturable) or bool(self.batch.segments)

    def apply(self, y: torch.Tensor, x: torch.Tensor, weights: SlotWeights) -> None:
        """Adds each row's adapter delta to ``y`` [N, out] in place, from ``x`` [N, in].

        Semantics, for every row ``i`` whose sequence uses slot ``s`` (base rows are left alone)::

            y[i] += dora_gain[s] * y[i] + dora_shift[s]      # DoRA: g * y + b0, gain = g - 1
            y[i] += (x[i] @ a[s]) @ b[s] + bias[s]           # per member column slice (see the ops)
        """
        batch = self.batch
        if batch.static and self.capturable and not weights.resident_host_pass:  # maybe in a compiled graph
            self.sgmv_static(y, x, weights)
            return
        batch.check_rows(x.shape[0])
        if not batch.segments and not batch.static:
            return
        live = batch.live_mask
        if weights.dora_mask & live:  # y = g * (W x) + b0  ==  y + (g - 1) * y + (1 - g) * b0
            rows = batch.slot_rows(x.device)
            gain = weights.dora_gain.index_select(0, rows.row_slot)
            shift = weights.dora_shift.index_select(0, rows.row_slot)
            rows.add_into(y, rows.take(y) * gain + shift)
        if weights.rank_mask & live:  # else no live slot targets this linear (a q/v adapter's o_proj)
            self.sgmv(y, x, weights)
        if weights.bias_mask & live:
            rows = batch.slot_rows(x.device)
            rows.add_into(y, weights.bias.index_select(0, rows.row_slot).to(y.dtype))

    def sgmv(self, y: torch.Tensor, x: torch.Tensor, weights: SlotWeights) -> None:
        """``y[i, cols_j] += (x[i] @ A_j[s, :, :r]) @ b[s, :r, cols_j]`` for every LoRA row ``i`` of the
        batch (slot ``s``) and member ``j``; see ``server.lora.ops.sgmv_torch``."""
        raise NotImplementedError

    def sgmv_static(self, y: torch.Tensor, x: torch.Tensor, weights: SlotWeights) -> None:
        """``sgmv`` for a static step of a ``capturable`` backend: the same launches every step,
        reading the step's slots from persistent buffers (no DoRA or lora_bias slot is resident then:
        ``AdapterManager.graph_safe``)."""
        self.sgmv(y, x, weights)


class TorchLoRABackend(LoRABackend):
    name = "torch"

    def sgmv(self, y, x, weights) -> None:
        from server.lora.ops.sgmv_torch import sgmv_torch

        if self.batch.segments:
            sgmv_torch(y, x, weights, self.batch.slot_rows(x.device))


class CpuLoRABackend(LoRABackend):
    name = "cpu"
    capturable = True  # static steps: one kernel call per target over the persistent per-row slots

    def sgmv(self, y, x, weights) -> None:
        if self.batch.segments:
            sgmv_cpu(y, x, weights, self.batch.slot_rows(x.device))

    def sgmv_static(self, y, x, weights) -> None:
        n, static = x.shape[0], self.batch.static_rows
        sgmv_cpu_rows(y, x, weights, static.rows[:n], static.slots[:n])


class TritonLoRABackend(LoRABackend):
    name = "triton"
    capturable = True

    def sgmv(self, y, x, weights) -> None:
        from server.lora.ops.sgmv_triton import sgmv_triton

        batch = self.batch
        # A static (graph) step launches at the buffers' full rank for every member: its launches may
        # not depend on which slots are live. Eager steps read only the live rank blocks, and skip a
        # member no live slot targets (k of q/v adapters).
        r = weights.table.blocks * RANK_BLOCK if batch.static else weights.live_rank(batch.live_slots)
        if r == 0:
            return
        for j, cols in enumerate(weights.slices):
            if not batch.static and not any(weights.rank[j][s] for s in batch.live_slots):
                continue
            sgmv_triton(
                y[:, cols], x, weights.a[:, :, j], weights.b[:, :, cols], weights.page_table, r, batch
            )


BACKENDS: dict[str, type[LoRABackend]] = {
    "torch": TorchLoRABackend,
    "cpu": CpuLoRABackend,
    "triton": TritonLoRABackend,
}


def triton_available(device: torch.device | str) -> bool:
    """Triton runs on CUDA devices, or anywhere under its interpreter (``TRITON_INTERPRET=1``)."""
    return triton_unavailable(device) is None


def cpu_kernel_available(device: torch.device | str) -> bool:
    """The native CPU kernel serves CPU devices where it builds (the first call builds it)."""
    from server.lora.ops.sgmv_cpu import sgmv_cpu_available

    return torch.device(device).type == "cpu" and sgmv_cpu_available()


def make_lora_backend(requested: str, device: torch.device | str, max_loras: int) -> LoRABackend:
    """``Settings.lora_backend`` -> a backend: 'auto' is triton on CUDA when importable, the native
    kernel on CPU when it builds, else torch."""
    name = requested
    if requested == "auto":
        if torch.device(device).type == "cuda":
            name = "triton" if triton_available(device) else "torch"
        else:
            name = "cpu" if cpu_kernel_available(device) else "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown LoRA backend {requested!r}; expected 'auto' or one of {sorted(BACKENDS)}")
    if name == "triton" and not triton_available(device):
        raise ValueError(
            f"lora_backend='triton' needs triton and a CUDA device (or TRITON_INTERPRET=1), got {device}"
        )
    if name == "cpu" and not cpu_kernel_available(device):
        raise ValueError(
            f"lora_backend='cpu' needs a CPU device and a C++ compiler to build it, got {device}"
        )
    return BACKENDS[name](max_loras)
