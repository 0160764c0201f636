"""PackedLinear: nn.Linear's results for every input size and dtype, installed by the loader on CPU;
the fp32 panel kernel (csrc/linear_cpu.cpp) at the shapes its blocking has edges at."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from server import native
from server.model import cpu_linear
from server.model.cpu_linear import (
    LinearKernel,
    PackedLinear,
    onednn_packable,
    panel_kernel_built,
    use_packed_linears,
)
from server.model.loader import load_model

pytestmark = pytest.mark.skipif(
    not onednn_packable(torch.zeros(1)), reason="torch without oneDNN's packed linear on this CPU"
)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 64), (1, 7, 64), (3, 5, 64), (300, 64), (0, 64)])
def test_matches_nn_linear(shape, bias):
    torch.manual_seed(0)
    ref = nn.Linear(64, 200, bias=bias)
    packed = nn.Linear(64, 200, bias=bias)
    packed.load_state_dict(ref.state_dict())
    assert use_packed_linears(packed) == 1 and isinstance(packed, nn.Linear)
    x = torch.randn(*shape)
    with torch.inference_mode():
        want, got = ref(x), packed(x)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def needs_panels(test):
    test = pytest.mark.usefixtures("kernels_on_any_cpu")(test)
    return pytest.mark.skipif(
        not panel_kernel_built(torch.float32), reason="the panel kernel could not be built here"
    )(test)


@needs_panels
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 11, 12, 13, 24, 32, 37, 130])
@pytest.mark.parametrize("out_features", [1, 15, 16, 17, 31, 32, 33, 200])
def test_panel_kernel_matches_f_linear(rows, out_features):
    """Row counts around the 12-row (AVX-512) and 6-row (AVX2) register blocks, output widths around
    the 32-column panel and its 16-column AVX2 slices (the last panel's columns past ``out`` are
    padding and must not be written), an odd input size."""
    torch.manual_seed(rows * 1000 + out_features)
    weight, bias, x = torch.randn(out_features, 45), torch.randn(out_features), torch.randn(rows, 45)
    for b in (None, bias):
        kernel = LinearKernel(weight, b)
        assert kernel.panels is not None and kernel.packed is None
        y = kernel(x)
        assert y.shape == (rows, out_features) and y.is_contiguous()
        torch.testing.assert_close(y, torch.nn.functional.linear(x, weight, b), rtol=1e-5, atol=1e-5)


needs_bf16_panels = pytest.mark.skipif(
    not panel_kernel_built(torch.bfloat16), reason="no avx512_bf16 panel kernel here"
)


@needs_bf16_panels
@pytest.mark.parametrize("rows", [1, 12, 13, 37])
@pytest.mark.parametrize("in_features", [1, 44, 45])  # odd: the last k has no pair
def test_bf16_panel_kernel_is_the_fp32_product_rounded_once(rows, in_features):
    """vdpbf16ps accumulates bf16 products in fp32; the result (plus bias) is rounded to bf16 once:
    within half a bf16 ulp of the exact fp32 product of the same bf16 inputs, up to accumulation order."""
    torch.manual_seed(rows + in_features)
    weight = torch.randn(70, in_features).to(torch.bfloat16)
    bias = torch.randn(70).to(torch.bfloat16)
    x = torch.randn(rows, in_features).to(torch.bfloat16)
    for b in (None, bias):
        kernel = LinearKernel(weight, b)
        assert kernel.panels is not None
        y = kernel(x)
        assert y.dtype == torch.bfloat16 and y.shape == (rows, 70)
        exact = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
        assert ((y.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-5).all()


@needs_panels
def test_panel_kernel_reads_rows_at_any_stride_and_leading_shape():
    torch.manual_seed(0)
    weight = torch.randn(64, 40)
    kernel = LinearKernel(weight, None)
    wide = torch.randn(6, 100)
    strided = wide[:, 10:50]  # rows 100 floats apart
    torch.testing.assert_close(kernel(strided), strided @ weight.T, rtol=1e-5, atol=1e-5)
    columns = torch.randn(40, 6).T  # no contiguous rows at all
    torch.testing.assert_close(kernel(columns), columns @ weight.T, rtol=1e-5, atol=1e-5)
    batched = torch.randn(2, 3, 40)
    assert kernel(batched).shape == (2, 3, 64)
    torch.testing.assert_close(kernel(batched), batched @ weight.T, rtol=1e-5, atol=1e-5)


@needs_panels
def test_panel_kernel_in_a_compiled_graph():
    torch.manual_seed(0)
    layer = nn.Linear(40, 70)
    reference = nn.Linear(40, 70)
    reference.load_state_dict(layer.state_dict())
    use_packed_linears(layer)
    x = torch.randn(5, 40)
    compiled = torch.compile(lambda t: torch.relu(layer(t)), fullgraph=True, dynamic=True)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), torch.relu(reference(x)), rtol=1e-5, atol=1e-5)


def test_bf16_where_the_cpu_has_it():
    if not onednn_packable(torch.zeros(1, dtype=torch.bfloat16)):
        pytest.skip("no native bf16 on this CPU")
    torch.manual_seed(0)
    ref = nn.Linear(64, 96).to(torch.bfloat16)
    packed = nn.Linear(64, 96).to(torch.bfloat16)
    packed.load_state_dict(ref.state_dict())
    assert use_packed_linears(packed) == 1
    x = torch.randn(9, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x).float(), ref(x).float(), rtol=2e-2, atol=2e-2)


def test_in_place_weight_writes_reach_the_packed_copy():
    layer = nn.Linear(16, 8)
    use_packed_linears(layer)
    x = torch.randn(3, 16)
    with torch.no_grad():
        layer.weight.mul_(2.0)
        layer.weights_changed()  # what merge_adapter_into_model calls after writing
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_only_plain_cpu_linears_of_packable_dtypes_are_swapped():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).to(torch.float16), nn.Embedding(3, 4))
    assert use_packed_linears(model) == 1
    assert type(model[0]) is PackedLinear and type(model[1]) is nn.Linear


def test_loader_installs_it_on_cpu(tiny_llama_dir):
    model = load_model(tiny_llama_dir, "cpu", torch.float32)
    assert (
        type(model.lm_head) is PackedLinear and type(model.model.layers[0].self_attn.o_proj) is PackedLinear
    )
    assert "lm_head.weight" in model.state_dict()


def test_cpu_weights_are_cast_on_the_loading_thread(tiny_llama_dir, monkeypatch):
    """transformers' loading thread pool would start extra OpenMP teams while casting fp32 weights to
    bf16, and under a bound OpenMP runtime the engine's team could land on one core (2x slower decode,
    measured): on CPU the cast runs on the loading thread; the variable is restored afterwards."""
    loading = pytest.importorskip("transformers.core_model_loading")  # transformers >= 5

    pools = []

    class Recording(loading.ThreadPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(loading, "ThreadPoolExecutor", Recording)
    monkeypatch.delenv("HF_DEACTIVATE_ASYNC_LOAD", raising=False)
    model = load_model(tiny_llama_dir, "cpu", torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert pools == []
    assert "HF_DEACTIVATE_ASYNC_LOAD" not in os.environ


def test_a_cpu_the_panel_kernel_is_not_tuned_for_keeps_onednn(monkeypatch):
    """The panel kernel has register blocking for AVX-512 and for AVX2 + FMA; elsewhere oneDNN runs
    the linears."""
    monkeypatch.setattr(cpu_linear, "panel_kernel_tuned", lambda: False)
    torch.manual_seed(0)
    weight, x = torch.randn(70, 40), torch.randn(5, 40)
    kernel = LinearKernel(weight, None)
    assert kernel.panels is None and kernel.packed is not None
    torch.testing.assert_close(kernel(x), x @ weight.T, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not panel_kernel_built(torch.float32), reason="the panel kernel could not be built here")
def test_the_build_has_the_register_blocking_of_its_target():
    """An AVX-512 build keeps 12 x 32 blocks in zmm registers, an AVX2 + FMA build 6 x 16 in ymm ones
    (``-mno-avx512f`` in LORAPLEX_NATIVE_CFLAGS builds the AVX2 one on an AVX-512 CPU)."""
    flags = native._cpu_fingerprint().split()
    if native.wide_vector_cpu():  # the CPU's avx512f, unless the build flags take it away
        want = "avx512"
    elif "avx2" in flags and "fma" in flags:
        want = "avx2"
    else:
        want = "generic"
    assert torch.ops.loraplex_linear_cpu.variant() == want
