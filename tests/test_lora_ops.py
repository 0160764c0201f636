"""The SGMV op: torch reference vs a naive per-row loop, the Triton kernels (interpreted) vs torch."""

from __future__ import annotations

import pytest
import torch

from server.lora.backend import make_lora_backend
from server.lora.batch import LoRABatch
from server.lora.ops.sgmv_torch import sgmv_torch


def _naive(y, x, a, b, seq_slots, seq_lens):
    """Row by row: y[i] += (x[i] @ A[slot]) @ B[slot] for rows whose sequence has a slot."""
    out = y.clone()
    row = 0
    for slot, n in zip(seq_slots, seq_lens, strict=True):
        for i in range(row, row + n):
            if slot >= 0:
                out[i] += (x[i] @ a[slot]) @ b[slot]
        row += n
    return out


def _stacked(num_slots, ranks, d_in, d_out, dtype=torch.float32, seed=0):
    """Slot buffers padded to max(ranks) with zeros, like LoRALinear's."""
    g = torch.Generator().manual_seed(seed)
    max_rank = max(ranks)
    a = torch.zeros(num_slots, d_in, max_rank, dtype=dtype)
    b = torch.zeros(num_slots, max_rank, d_out, dtype=dtype)
    for slot, r in enumerate(ranks):
        a[slot, :, :r] = torch.randn(d_in, r, generator=g, dtype=dtype)
        b[slot, :r] = torch.randn(r, d_out, generator=g, dtype=dtype)
    return a, b


CASES = [  # (seq slots, seq lengths) covering each strategy of the torch op (see sgmv_torch)
    ([0, 1, 2, 3], [5, 3, 8, 1]),  # per-slot groups, padded
    ([2, 2, 0, -1, 1, 1, 3], [1] * 7),  # unsorted decode, slot 2 twice: padded groups
    ([3, -1, 0, 3, -1, 1], [4, 2, 7, 1, 3, 17]),  # gaps of base rows, slot 3 in two segments
    ([-1, 0, 0, 1, 1, 2, 2, 3, 3], [2] + [1] * 8),  # sorted round-robin decode: dense, copy-free
    ([0, 1, 2], [40, 40, 40]),  # equal prefills: dense with wide groups
    ([0, 1], [40, 3]),  # long uneven segments: per-segment loop
    ([0, 3], [2, 2]),  # sparse slot range: per-segment loop
    ([-1, -1], [3, 4]),  # base rows only
    ([1], [33]),  # one segment
]


@pytest.mark.parametrize("seq_slots,seq_lens", CASES)
def test_torch_reference_matches_naive(seq_slots, seq_lens):
    a, b = _stacked(4, [4, 8, 16, 2], 48, 40)
    n = sum(seq_lens)
    x, y = torch.randn(n, 48), torch.randn(n, 40)
    batch = LoRABatch(4)
    batch.set(seq_slots, seq_lens)
    got = y.clone()
    sgmv_torch(got, x, a, b, batch, ranks=[4, 8, 16, 2])
    torch.testing.assert_close(got, _naive(y, x, a, b, seq_slots, seq_lens), rtol=1e-5, atol=1e-4)
    padded = y.clone()  # slicing to the live rank == using the zero-padded buffers
    sgmv_torch(padded, x, a, b, batch)
    torch.testing.assert_close(got, padded, rtol=1e-5, atol=1e-4)


def test_strategy_layouts():
    batch = LoRABatch(4)
    batch.set(*CASES[3])
    groups = batch.slot_groups(torch.device("cpu"))
    assert groups.dense and (groups.lo, groups.hi, groups.width, groups.first_row) == (0, 3, 2, 2)
    batch.set(*CASES[1])
    groups = batch.slot_groups(torch.device("cpu"))
    assert not groups.dense and groups.width == 2 and groups.rows.tolist() == [0, 1, 2, 4, 5, 6]
    assert groups.padded.tolist() == [4, 5, 0, 2, 3, 6]  # slot 2 rows -> group 2, slot 0 -> group 0, ...


def test_base_rows_are_untouched_and_cost_nothing():
    batch = LoRABatch(2)
    batch.set([-1, 0, -1, 1, 1], [3, 2, 4, 1, 2])
    assert batch.segments == [(3, 5, 0), (9, 12, 1)]  # consecutive same-slot sequences merge
    a, b = _stacked(2, [4, 4], 8, 8)
    x, y = torch.randn(12, 8), torch.randn(12, 8)
    got = y.clone()
    sgmv_torch(got, x, a, b, batch)
    assert torch.equal(got[:3], y[:3]) and torch.equal(got[5:9], y[5:9])


def test_batch_validation():
    batch = LoRABatch(2)
    with pytest.raises(ValueError, match="slot 2"):
        batch.set([2], [1])
    with pytest.raises(ValueError, match="2 slots for 1 sequences"):
        batch.set([0, 1], [1])
    batch.set([0], [3])
    with pytest.raises(RuntimeError, match="set for 3 tokens"):
        batch.check_rows(4)


def test_backend_resolution(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert make_lora_backend("auto", "cpu", 2).name == "torch"
    assert make_lora_backend("torch", "cpu", 2).name == "torch"
    with pytest.raises(ValueError, match="needs triton"):
        make_lora_backend("triton", "cpu", 2)
    with pytest.raises(ValueError, match="unknown LoRA backend"):
        make_lora_backend("cuda-magic", "cpu", 2)
