"""Sibling projections that read the same input run as one GEMM: q/k/v, and gate/up.

Why: one [N, in] x [in, q+k+v] GEMM streams the input once and keeps the kernel busy on a wider
output than three narrow ones, and a LoRA hook on the group adds every member's delta in one batched
op. How, without giving up the Hugging Face modules (their RoPE, norms, sliding windows) or PEFT's
module names (adapters are validated and addressed by them):

* at load the members' weights are concatenated into one tensor and each member's ``weight``
  becomes a view of its rows, so ``BaseModelSpec.weight``, merging and state dicts still see
  per-module weights (a merge writes through the view into the fused tensor, then calls
  ``weights_changed``);
* each member stays where it was, as a ``FusedMemberLinear``; whichever member is called first with
  an input runs the fused GEMM (plus the group's ``delta`` hook, e.g. LoRA) and caches the result,
  and the others, called with *that same tensor object*, return their column slice of it. Identity
  is the guard: the HF attention and MLP forwards pass one tensor to all members, and inputs are
  not written in place between those calls. A member called with another tensor (or twice) just
  recomputes, so an unknown calling pattern is slower, never wrong; the cache is dropped once every
  member has taken its slice.

Groups are found by name (``FUSIBLE_GROUPS``) among the children of one module, and only when every
member is a plain nn.Linear with the same input size, device, dtype and bias presence; any other
architecture simply keeps its separate linears.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from server.model.cpu_linear import LinearKernel

log = logging.getLogger(__name__)

FUSIBLE_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

# delta(y, x): adds to ``y`` [N, sum(out)] in place, from ``x`` [N, in] (both 2-D, ``y`` contiguous).
DeltaHook = Callable[[torch.Tensor, torch.Tensor], None]


class FusedProjection:
    """One weight for several sibling linears; ``output_for(i, x)`` is member i's output for x."""

    def __init__(self, members: list[nn.Linear]) -> None:
        self.in_features = members[0].in_features
        self.out_features = [m.out_features for m in members]
        bounds = [0]
        for n in self.out_features:
            bounds.append(bounds[-1] + n)
        self.slices = [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]
        with torch.no_grad():
            weight = torch.cat([m.weight.detach() for m in members])
            bias = None if members[0].bias is None else torch.cat([m.bias.detach() for m in members])
        for m, cols in zip(members, self.slices, strict=True):
            m.weight = nn.Parameter(weight[cols], requires_grad=False)  # views: writes reach ``weight``
            if bias is not None:
                m.bias = nn.Parameter(bias[cols], requires_grad=False)
        self.kernel = LinearKernel(weight, bias)
        self.delta: DeltaHook | None = None
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._taken = [False] * len(members)

    @property
    def weight(self) -> torch.Tensor:
        return self.kernel.weight

    def output_for(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if x is not self._input or self._taken[index]:
            self._run(x)
        out = self._output
        self._taken[index] = True
        if all(self._taken):  # every member has its slice: let go of the input and the output
            self._input = self._output = None
        return out[..., self.slices[index]]

    def _run(self, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, self.in_features)
        y = self.kernel(x2)
        if self.delta is not None:
            self.delta(y, x2)
        self._input = x
        self._output = y.view(*x.shape[:-1], y.shape[-1])
        self._taken = [False] * len(self._taken)

    def weights_changed(self) -> None:
        self.kernel.repack()


class FusedMemberLinear(nn.Linear):
    """A member of a ``FusedProjection``: still an nn.Linear with its own (view) weight and name."""

    fused: FusedProjection
    fused_index: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.output_for(self.fused_index, x)

    def weights_changed(self) -> None:
        self.fused.weights_changed()


def _fusible(members: list[nn.Module]) -> bool:
    first = members[0]
    return all(
        type(m) is nn.Linear
        and m.in_features == first.in_features
        and m.weight.device == first.weight.device
        and m.weight.dtype == first.weight.dtype
        and (m.bias is None) == (first.bias is None)
        for m in members
    )


def fuse_projections(model: nn.Module, groups=FUSIBLE_GROUPS) -> list[FusedProjection]:
    """Fuses every sibling group of ``groups`` found in ``model`` (in place); returns the groups."""
    fused: list[FusedProjection] = []
    for parent in model.modules():
        for names in groups:
            members = [getattr(parent, name, None) for name in names]
            if any(m is None for m in members) or not _fusible(members):
                continue
            projection = FusedProjection(members)
            for index, member in enumerate(members):
                member.__class__ = FusedMemberLinear
                member.fused = projection
                member.fused_index = index
            fused.append(projection)
    if fused:
        log.info("fused %d sibling projection groups (q/k/v, gate/up) into single GEMMs", len(fused))
    return fused


def fused_projection_of(module: nn.Module) -> FusedProjection | None:
    """The fused group ``module`` belongs to, if any."""
    return module.fused if isinstance(module, FusedMemberLinear) else None
