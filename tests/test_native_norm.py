"""Native RMSNorm (server/model/native_norm.py): the Hugging Face module's outputs, swapped only where
the op reproduces them, and installed by the loader."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from server.model.decoder_ops import decoder_ops_available
from server.model.loader import load_model
from server.model.native_norm import use_native_rms_norms

pytestmark = pytest.mark.skipif(not decoder_ops_available(), reason="the kernel could not be built here")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [16, 40, 512])
def test_matches_the_hf_module(dtype, hidden):
    torch.manual_seed(hidden)
    ref = LlamaRMSNorm(hidden, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(hidden))
    ref = ref.to(dtype)
    native = LlamaRMSNorm(hidden, eps=1e-5).to(dtype)
    native.load_state_dict(ref.state_dict())
    assert use_native_rms_norms(native) == 1 and isinstance(native, LlamaRMSNorm)
    x = (torch.randn(2, 7, hidden) * 4).to(dtype)
    strided = (torch.randn(5, 2 * hidden) * 4).to(dtype)[:, :hidden]
    with torch.inference_mode():
        for inp in (x, strided):
            want, got = ref(inp), native(inp)
            assert got.shape == want.shape and got.dtype == want.dtype
            if dtype == torch.float32:
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            else:  # the same two bf16 roundings; the fp32 statistic may differ in its last bit
                assert (got.float() - want.float()).abs().max() <= 2**-7 * want.float().abs().max()
    assert "weight" in native.state_dict()


class OnePlusWeightRMSNorm(nn.Module):  # Gemma's form: must keep its own forward
    def __init__(self, hidden):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden))
        self.eps = 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


def test_a_norm_the_op_does_not_reproduce_keeps_its_forward():
    module = OnePlusWeightRMSNorm(32)
    assert use_native_rms_norms(module) == 0 and type(module) is OnePlusWeightRMSNorm


def test_other_dtypes_inputs_run_the_original():
    norm = LlamaRMSNorm(32)
    use_native_rms_norms(norm)
    x = torch.randn(3, 32, dtype=torch.float64)
    torch.testing.assert_close(norm(x), LlamaRMSNorm.forward(norm, x))


def test_loader_installs_it_on_cpu(tiny_llama_dir):
    model = load_model(tiny_llama_dir, "cpu", torch.float32)
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms and all(type(m).__name__ == "NativeLlamaRMSNorm" for m in norms)
