"""CPU linears with each weight packed once at load: our panel kernel (fp32; bf16 where the CPU has
avx512_bf16), else oneDNN's packed linear.

Why not ``F.linear``: on CPU it hands fp32 to MKL's sgemm, and MKL runs its AVX2 code on AMD CPUs (it
dispatches AVX-512 only on Intel's). oneDNN, which torch ships as ``mkldnn``, uses AVX-512 and
avx512_bf16 wherever the CPU has them, and a weight reordered once into its blocked layout saves the
reorder every call would otherwise pay. Measured on the development machine (AMD EPYC, one thread,
CPU time, 32 rows): a 512x2752 projection takes 944 us through ``F.linear`` and 389 us packed (fp32),
253 us vs 201 us in bf16; the 512x32000 lm_head 14.3 ms vs 5.4 ms (fp32).

Why our own kernel (``csrc/linear_cpu.cpp``): a decode step streams every weight from DRAM, and
oneDNN leaves that stream to the hardware prefetcher; the kernel prefetches its next panel while it
computes the current one. Measured (2 threads, the bench model's 33 GEMMs of a step back to back, 32
rows): fp32 5.0-5.6 ms against oneDNN's 6.8-7.4, and faster at every row count from 1 to 1024, so
prefill takes it as well; bf16 2.9-3.1 ms against 3.6. Where the kernel cannot be built (no compiler)
or has no bf16 (no avx512_bf16), those weights take oneDNN.

Only the order of the same products changes, so results agree with ``F.linear`` to float rounding.
The plain weight stays the module's parameter (state dicts, merging and ``BaseModelSpec.weight`` read
it); whoever writes it in place calls ``weights_changed()`` so the packed copy follows.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from server.native import load_kernel

log = logging.getLogger(__name__)

PANEL_SOURCE = Path(__file__).parent / "csrc" / "linear_cpu.cpp"
PANEL = 32  # output columns per packed panel (the kernel's)


def panel_kernel_built(dtype: torch.dtype) -> bool:
    """Whether the panel kernel is built here for ``dtype``: fp32, or bf16 where the CPU has
    avx512_bf16 (the kernel's vdpbf16ps)."""
    if dtype not in (torch.float32, torch.bfloat16):
        return False
    if not load_kernel("loraplex_linear_cpu", PANEL_SOURCE, fakes=("loraplex_linear_cpu::linear",)):
        return False
    return dtype == torch.float32 or torch.ops.loraplex_linear_cpu.has_bf16()


def panel_kernel_tuned() -> bool:
    """Whether the built panel kernel has register blocking for this CPU: AVX-512 (12 x 32 blocks) or
    AVX2 + FMA (6 x 16). A build for any other CPU is the plain vector code, correct but untuned (on
    the AVX2 EPYC, before it had its own blocking, the AVX-512 one ran ~25x slower than oneDNN)."""
    return torch.ops.loraplex_linear_cpu.variant() in ("avx512", "avx2")


def panel_kernel_usable(weight: torch.Tensor) -> bool:
    """Whether ``weight`` runs through the panel kernel: on CPU, built for its dtype and tuned here."""
    return weight.device.type == "cpu" and panel_kernel_built(weight.dtype) and panel_kernel_tuned()


def onednn_packable(weight: torch.Tensor) -> bool:
    """Whether a weight of this device and dtype runs through oneDNN's packed linear here."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):  # private op: absent in some builds
        return False
    if weight.dtype == torch.float32:
        return True
    return weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def packable(weight: torch.Tensor) -> bool:
    """Whether one of the packed kernels runs a weight of this device and dtype here."""
    return panel_kernel_usable(weight) or onednn_packable(weight)


class LinearKernel:
    """``x @ weight.T + bias`` for one (possibly fused) weight: panels for our fp32 kernel, else
    oneDNN's packed copy, else plain ``F.linear``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight = weight
        self.bias = bias
        self.panels: torch.Tensor | None = (
            None  # [ceil(out / 32), in, 32, 1] fp32 / [.., ceil(in / 2), 32, 2] bf16
        )
        self.panel_bias: torch.Tensor | None = None  # bias padded to whole panels
        self.packed: torch.Tensor | None = None  # oneDNN's layout
        self.next: LinearKernel | None = None  # the linear that runs after this one (a prefetch hint)
        self.repack()

    def repack(self) -> None:
        """Re-derives the packed copy from ``weight`` (after an in-place write such as a merge)."""
        weight = self.weight.detach()
        if panel_kernel_usable(weight):
            self.panels = torch.ops.loraplex_linear_cpu.pack(weight)
            if self.bias is not None:
                self.panel_bias = F.pad(
                    self.bias.detach(), (0, self.panels.shape[0] * PANEL - weight.shape[0])
                )
        elif onednn_packable(weight):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        if self.panels is not None:
            if torch.compiler.is_compiling():
                return panel_linear(x, self.panels, self.panel_bias, self.weight.shape[0])
            following = self.next.panels if self.next is not None else None
            return run_panel_linear(x, self.panels, self.panel_bias, self.weight.shape[0], following)
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        if torch.compiler.is_compiling():  # inductor lowers mkldnn linears only for frozen weights
            return packed_linear(x, self.packed, self.bias, self.weight.shape[0])
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [None], "")


def run_panel_linear(
    x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None, out_features: int, following=None
) -> torch.Tensor:
    """The panel kernel on ``x`` [..., in]: a fresh contiguous [..., out]. ``following``: the panels of
    the linear that runs next, whose first panels each thread prefetches at its end."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y = rows.new_empty(rows.shape[0], out_features)
    torch.ops.loraplex_linear_cpu.linear(y, rows, panels, bias, following)
    return y.view(*x.shape[:-1], out_features)


@torch.library.custom_op("loraplex::panel_linear", mutates_args=())
def panel_linear(
    x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """The panel kernel as an opaque op for torch.compile'd graphs (eager calls it directly)."""
    return run_panel_linear(x, panels, bias, out_features)


@panel_linear.register_fake
def _(x, panels, bias, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("loraplex::packed_linear", mutates_args=())
def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """The packed oneDNN linear as an opaque op for torch.compile'd graphs (eager calls it directly)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], "")


@packed_linear.register_fake
def _(x, packed, bias, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


class PackedLinear(nn.Linear):
    """nn.Linear whose forward runs its ``LinearKernel``.

    A subclass (installed by swapping ``__class__``) so parameters, state dicts, ``isinstance``
    checks, PEFT-style targeting and merging all see a plain nn.Linear.
    """

    kernel: LinearKernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x)

    def weights_changed(self) -> None:
        self.kernel.repack()


def use_packed_linears(model: nn.Module) -> int:
    """Swaps every plain nn.Linear of ``model`` that a packed kernel runs to PackedLinear; returns how many."""
    swapped = 0
    for module in model.modules():
        if type(module) is nn.Linear and packable(module.weight):
            module.__class__ = PackedLinear
            module.kernel = LinearKernel(module.weight, module.bias)
            swapped += 1
    if swapped:
        log.info("%d linears packed", swapped)
    return swapped
