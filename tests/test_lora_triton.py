"""Triton SGMV kernels, run on CPU by Triton's interpreter, against the torch reference.

``test_triton_kernels_under_interpreter`` runs this file in a child pytest under Triton's interpreter
(``tests/triton_child.py``); this module imports only torch and server.lora (no transformers) to keep
that child quick. In the parent the kernel tests report "skipped: runs in the child".
"""

from __future__ import annotations

import pytest
import torch

from server.lora.adapter import LoRAModuleWeights
from server.lora.backend import make_lora_backend
from server.lora.layers import LoRALinear
from server.lora.slot_weights import MemberFacts, SlotWeights, blocks_for
from server.lora.spec import linear_spec
from tests.triton_child import only_in_child, run_child


def test_triton_kernels_under_interpreter():
    run_child(__file__)


@pytest.fixture
def interpreted():
    only_in_child()
    assert make_lora_backend("triton", "cpu", 2).name == "triton"


def _weights(members: int, ranks, d_in: int, outs, seed=0, paged=False) -> SlotWeights:
    """Slot i at rank ``ranks[i]``; ``paged``: on pages handed out in a scattered order, only as many
    as each rank needs (then a slot's other page-table entries name the zero page)."""
    g = torch.Generator().manual_seed(seed)
    names = [f"m{j}" for j in range(members)]
    if paged:
        needs = [blocks_for(r) for r in ranks]
        weights = SlotWeights(
            names, d_in, outs, len(ranks), 64, "cpu", torch.float32, num_pages=sum(needs) + 1
        )
        order = torch.randperm(sum(needs) + 1, generator=g).tolist()
        for slot, n in enumerate(needs):
            weights.table.map(slot, [order.pop() for _ in range(n)])
    else:
        weights = SlotWeights(names, d_in, outs, len(ranks), max(ranks), "cpu", torch.float32)
    for slot, r in enumerate(ranks):
        for j, out in enumerate(outs):
            module = LoRAModuleWeights(
                a=torch.randn(r, d_in, generator=g), b=torch.randn(out, r, generator=g), scale=0.5
            )
            weights.write(slot, j, module, None)
    return weights


def _both(weights, x, y, seq_slots, seq_lens):
    outputs = {}
    for name in ("torch", "triton"):
        backend = make_lora_backend(name, "cpu", weights.num_slots)
        backend.plan(seq_slots, seq_lens)
        outputs[name] = y.clone()
        backend.apply(outputs[name], x, weights)
    return outputs["triton"], outputs["torch"]


CASES = [  # (seq slots, seq lengths): prefill-like, decode-like, unsorted with gaps, base only, long
    ([0, 1, 2, 3], [5, 3, 8, 1]),
    ([2, 2, 0, -1, 1, 1, 3], [1] * 7),
    ([3, -1, 0, 3, -1, 1], [4, 2, 7, 1, 3, 17]),
    ([-1, -1], [3, 4]),
    ([1], [70]),
]


@pytest.mark.parametrize("seq_slots,seq_lens", CASES)
@pytest.mark.parametrize("ranks", [[4, 8, 16, 64], [16, 16, 16, 16]])
@pytest.mark.parametrize("outs", [[80], [48, 16, 16]])  # one linear; a fused q/k/v group
def test_triton_sgmv_matches_torch(interpreted, seq_slots, seq_lens, ranks, outs):
    # in/out not multiples of the blocks; mixed ranks on scattered pages
    weights = _weights(len(outs), ranks, 72, outs, seed=len(seq_lens), paged=len(set(ranks)) > 1)
    n = sum(seq_lens)
    got, want = _both(weights, torch.randn(n, 72), torch.randn(n, sum(outs)), seq_slots, seq_lens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16])
def test_triton_sgmv_with_half_width_weights_under_fp32(interpreted, wdtype):
    """``Settings.lora_dtype``: half-width slots, fp32 activations; the kernel widens the weights."""
    weights = _weights(3, [4, 8, 16, 64], 72, [48, 16, 16])
    narrow = SlotWeights(weights.names, 72, [48, 16, 16], 4, 64, "cpu", wdtype)
    for name in ("a", "b"):
        getattr(narrow, name).copy_(getattr(weights, name))
        getattr(weights, name).copy_(getattr(narrow, name))  # the reference holds the rounded values
    for slot in range(4):
        narrow.set_facts(slot, [MemberFacts(rank=weights.rank[j][slot]) for j in range(3)])
    seq_slots, seq_lens = CASES[2]
    n = sum(seq_lens)
    x, y = torch.randn(n, 72), torch.randn(n, 80)
    backend = make_lora_backend("triton", "cpu", 4)
    backend.plan(seq_slots, seq_lens)
    got = y.clone()
    backend.apply(got, x, narrow)
    want = _both(weights, x, y, seq_slots, seq_lens)[1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_triton_static_step_reads_every_block_and_adds_nothing_past_a_slots_pages(interpreted):
    """A static (graph) step launches at the full rank for every row: blocks a slot does not own read
    the zero page."""
    weights = _weights(3, [4, 40, 16, 64], 72, [48, 16, 16], seed=3, paged=True)
    seq_slots = [1, 0, -1, 3, 2, 1, 0]
    x, y = torch.randn(7, 72), torch.randn(7, 80)
    backend = make_lora_backend("triton", "cpu", 4)
    backend.plan(seq_slots, [1] * 7, static=True)
    got = y.clone()
    backend.apply(got, x, weights)
    want = _both(weights, x, y, seq_slots, [1] * 7)[1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_triton_eager_step_skips_a_member_no_live_slot_targets(interpreted):
    """q/v adapters in a fused q/k/v group: an eager step launches nothing for k (its pages are not
    read: poisoned here), and q and v match the torch reference."""
    weights = _weights(3, [8, 16, 40], 72, [48, 16, 16], seed=4, paged=True)
    for slot in range(3):
        weights.write(slot, 1, None, None)
    seq_slots, seq_lens = [2, 0, -1, 1], [3, 1, 2, 5]
    x, y = torch.randn(11, 72), torch.randn(11, 80)
    want = _both(weights, x, y, seq_slots, seq_lens)[1]
    weights.a[:, :, 1] = float("nan")
    weights.b[:, :, weights.slices[1]] = float("nan")
    backend = make_lora_backend("triton", "cpu", 3)
    backend.plan(seq_slots, seq_lens)
    got = y.clone()
    backend.apply(got, x, weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_triton_sgmv_on_non_contiguous_input(interpreted):
    """Strides are honoured, not assumed."""
    weights = _weights(1, [8, 4], 32, [24])
    x = torch.randn(10, 64)[:, ::2]
    got, want = _both(weights, x, torch.randn(10, 24), [1, 0], [4, 6])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@torch.inference_mode()
def test_triton_layer_with_dora_and_bias_matches_torch(interpreted):
    """A LoRALinear on each backend, slots holding plain, DoRA and lora_bias weights, base rows between."""
    torch.manual_seed(0)
    base = torch.nn.Linear(48, 40, bias=True)
    slots = [
        LoRAModuleWeights(a=torch.randn(4, 48), b=torch.randn(40, 4), scale=2.0),
        LoRAModuleWeights(
            a=torch.randn(16, 48), b=torch.randn(40, 16), scale=0.5, dora_g=torch.rand(40) + 0.5
        ),
        LoRAModuleWeights(a=torch.randn(8, 48), b=torch.randn(40, 8), scale=1.0, bias=torch.randn(40)),
    ]
    x = torch.randn(1, 19, 48)
    outputs = {}
    for backend in ("torch", "triton"):
        weights = SlotWeights(["l"], 48, [40], num_slots=3, max_rank=16, device="cpu", dtype=torch.float32)
        for slot, module_weights in enumerate(slots):
            weights.write(slot, 0, module_weights, base.bias)
        layer = LoRALinear(base, linear_spec("l", base), make_lora_backend(backend, "cpu", 3), weights)
        layer.backend.plan([2, -1, 1, 0, -1, 1], [3, 2, 5, 4, 1, 4])
        outputs[backend] = layer(x)
    torch.testing.assert_close(outputs["triton"], outputs["torch"], rtol=1e-5, atol=1e-4)
