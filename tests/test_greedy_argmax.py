"""The native greedy choice (server/engine/greedy.py) returns exactly torch.argmax(dim=-1)."""

from __future__ import annotations

import pytest
import torch

from server.engine.greedy import argmax_rows, native_argmax_available

pytestmark = [
    pytest.mark.skipif(not native_argmax_available(), reason="the kernel could not be built here"),
    pytest.mark.usefixtures("kernels_on_any_cpu"),
]


@pytest.mark.parametrize("vocab", [1, 7, 16, 17, 32000, 32003])
def test_matches_torch_on_random_rows(vocab):
    torch.manual_seed(vocab)
    logits = torch.randn(33, vocab)
    assert torch.equal(argmax_rows(logits), logits.argmax(dim=-1))


def test_ties_infinities_and_nans_as_torch():
    rows = torch.randn(8, 50)
    rows[0, [3, 20, 41]] = 9.0  # ties across lanes and vectors: the first
    rows[1, [5, 21]] = 9.0  # same lane, two vectors
    rows[2] = float("-inf")  # nothing but -inf: index 0
    rows[3, :] = float("-inf")
    rows[3, 49] = -1.0  # the maximum in the scalar tail
    rows[4, [7, 30]] = float("nan")  # NaN wins, the first one
    rows[5, 48] = float("nan")  # a NaN in the tail
    rows[6, 10] = float("inf")
    rows[7] = 0.0
    assert torch.equal(argmax_rows(rows), rows.argmax(dim=-1))


def test_strided_rows_and_other_dtypes_fall_back_or_work():
    logits = torch.randn(6, 2 * 40)[:, :40]  # rows 80 floats apart
    assert torch.equal(argmax_rows(logits), logits.argmax(dim=-1))
    half = torch.randn(3, 40, dtype=torch.bfloat16)
    assert torch.equal(argmax_rows(half), half.argmax(dim=-1))
    assert argmax_rows(torch.randn(0, 40)).shape == (0,)
