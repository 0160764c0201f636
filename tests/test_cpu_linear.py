"""SkinnyBatchLinear: same results as nn.Linear for every input size, installed by the loader on CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from server.model.cpu_linear import SKINNY_MAX_ROWS, SkinnyBatchLinear, use_skinny_linears
from server.model.loader import load_model


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 64), (1, 7, 64), (3, 5, 64), (SKINNY_MAX_ROWS + 1, 64), (0, 64)])
def test_matches_nn_linear(shape, bias):
    torch.manual_seed(0)
    ref = nn.Linear(64, 200, bias=bias)
    skinny = nn.Linear(64, 200, bias=bias)
    skinny.load_state_dict(ref.state_dict())
    assert use_skinny_linears(skinny) == 1 and isinstance(skinny, nn.Linear)
    x = torch.randn(*shape)
    with torch.inference_mode():
        want, got = ref(x), skinny(x)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_only_fp32_plain_linears_are_swapped():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).to(torch.bfloat16), nn.Embedding(3, 4))
    assert use_skinny_linears(model) == 1
    assert type(model[0]) is SkinnyBatchLinear and type(model[1]) is nn.Linear


def test_loader_installs_it_on_cpu_fp32(tiny_llama_dir):
    model = load_model(tiny_llama_dir, "cpu", torch.float32)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is SkinnyBatchLinear for m in linears)
    assert "lm_head.weight" in model.state_dict()
