"""The native CPU decode kernel against the batched-SDPA path of the same backend, on a real cache."""

from __future__ import annotations

import pytest
import torch

from server.model.attention.base import SeqSpan, StepLayout
from server.model.attention.torch_paged import TorchPagedAttention, native_decode_supported
from server.model.geometry import ModelGeometry

BLOCK = 4

pytestmark = pytest.mark.skipif(
    not native_decode_supported(64, torch.float32, torch.device("cpu")),
    reason="native kernel does not build here",
)


def _backend(kv_heads: int, head_dim: int, dtype) -> TorchPagedAttention:
    geometry = ModelGeometry(num_layers=1, num_kv_heads=kv_heads, head_dim=head_dim, max_position_embeddings=256,
                             vocab_size=10)  # fmt: skip
    backend = TorchPagedAttention(geometry, num_blocks=40, block_size=BLOCK, dtype=dtype, device="cpu")
    backend.kv_caches[0].normal_()  # stale keys everywhere: only the block tables decide what is read
    return backend


def _decode_spans(context_lens: list[int]) -> list[SeqSpan]:
    """One decode row per sequence; sequences own scattered, non-consecutive blocks."""
    spans, next_block = [], 1
    for row, ctx in enumerate(context_lens):
        table = [next_block + 2 * i for i in range(-(-ctx // BLOCK))]
        next_block += 2 * len(table) + 1
        spans.append(SeqSpan(row, 1, ctx, table))
    return spans


def _layout(spans: list[SeqSpan], max_blocks: int = 0) -> StepLayout:
    return StepLayout.from_spans(spans, BLOCK, "cpu", max_blocks=max_blocks)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 64), (4, 2, 128), (4, 4, 32), (16, 1, 16)])
@pytest.mark.parametrize("options", [{}, {"softcap": 30.0}, {"sliding_window": 5}, {"scaling": 0.3}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_native_decode_matches_sdpa(heads, kv_heads, head_dim, options, dtype):
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("no native bf16")
    backend = _backend(kv_heads, head_dim, dtype)
    layout = _layout(_decode_spans([1, 7, 4, 13, 9]), max_blocks=12)  # tables wider than needed
    g = torch.Generator().manual_seed(0)
    t = layout.num_tokens
    q = torch.randn(1, t, heads, head_dim, generator=g).to(dtype).transpose(1, 2)  # HF's [1, H, T, D] view
    k = torch.randn(1, kv_heads, t, head_dim, generator=g).to(dtype)
    v = torch.randn(1, kv_heads, t, head_dim, generator=g).to(dtype)
    args = (options.get("scaling"), options.get("sliding_window"), options.get("softcap"))
    outputs = {}
    for native in (True, False):
        backend.native_decode = native
        backend.plan(layout)
        outputs[native] = backend.forward(0, q, k, v, *args).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outputs[True], outputs[False], rtol=tol, atol=tol)


@torch.inference_mode()
def test_mixed_step_decode_rows_beside_a_prefill_chunk():
    backend = _backend(2, 64, torch.float32)
    layout = _layout([*_decode_spans([6, 3]), SeqSpan(2, 5, 5, [30, 31])])
    q = torch.randn(1, 8, 7, 64)
    k, v = torch.randn(1, 2, 7, 64), torch.randn(1, 2, 7, 64)
    outputs = {}
    for native in (True, False):
        backend.native_decode = native
        backend.plan(layout)
        outputs[native] = backend.forward(0, q, k, v, None, None, None)
    torch.testing.assert_close(outputs[True], outputs[False], rtol=1e-5, atol=1e-5)
