"""The FlashInfer backend's wiring, on the CPU, through a stand-in ``flashinfer`` module.

FlashInfer itself needs CUDA (and is not installed here), so these tests check what is ours: the
CSR description of a step (``paged_kv_csr``), which wrapper a step plans, the arguments it passes
(``window_left = window - 1``, soft-cap, scale, causal), planning once per step per configuration,
and the cache layout. The stand-in wrappers implement FlashInfer's documented semantics in plain
torch; outputs are compared with the torch reference backend.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from server.model.attention import SeqSpan, StepLayout, attention_backend_class, available
from server.model.attention.flashinfer_paged import paged_kv_csr
from server.model.attention.torch_paged import TorchPagedAttention
from server.model.geometry import ModelGeometry

BLOCK, HEADS, KV_HEADS, DIM = 4, 4, 2, 64


class _Wrapper:
    """FlashInfer's batch wrappers as documented: CSR pages, NHD caches, causal bottom-right aligned."""

    plans: list[dict] = []

    def __init__(self, workspace, kv_layout, **kwargs):
        assert kv_layout == "NHD" and workspace.dtype == torch.uint8

    def plan(self, *args, **kw):
        if len(args) == 8:  # prefill: qo_indptr first
            self.qo, args = args[0], args[1:]
        else:
            self.qo = None
        self.indptr, self.indices, self.last, _, _, _, self.page = args
        self.kw = kw
        _Wrapper.plans.append({"decode": self.qo is None, **kw})

    def run(self, q, kv):
        k_cache, v_cache = kv
        qo = self.qo if self.qo is not None else torch.arange(len(self.last) + 1)
        out = torch.empty_like(q)
        for i in range(len(self.last)):
            pages = self.indices[self.indptr[i] : self.indptr[i + 1]].long()
            ctx = (len(pages) - 1) * self.page + int(self.last[i])
            k = k_cache[pages].reshape(-1, *k_cache.shape[2:])[:ctx]
            v = v_cache[pages].reshape(-1, *v_cache.shape[2:])[:ctx]
            rows = q[qo[i] : qo[i + 1]]
            out[qo[i] : qo[i + 1]] = self._attend(rows, k, v, ctx)
        return out

    def _attend(self, q, k, v, ctx):
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scale = self.kw["sm_scale"] or q.shape[-1] ** -0.5
        s = torch.einsum("qhd,khd->hqk", q, k) * scale
        if self.kw["logits_soft_cap"]:
            s = self.kw["logits_soft_cap"] * torch.tanh(s / self.kw["logits_soft_cap"])
        q_pos = torch.arange(ctx - q.shape[0], ctx)[:, None]
        k_pos = torch.arange(ctx)[None, :]
        seen = k_pos <= q_pos
        if self.kw["window_left"] >= 0:
            seen &= q_pos - k_pos <= self.kw["window_left"]
        s = s.masked_fill(~seen, float("-inf"))
        return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v)


@pytest.fixture
def flashinfer_backend(monkeypatch):
    fake = types.ModuleType("flashinfer")
    fake.BatchDecodeWithPagedKVCacheWrapper = type("Decode", (_Wrapper,), {})
    fake.BatchPrefillWithPagedKVCacheWrapper = type("Prefill", (_Wrapper,), {})
    monkeypatch.setitem(sys.modules, "flashinfer", fake)
    _Wrapper.plans = []
    from server.model.attention.flashinfer_paged import FlashInferPagedAttention

    return FlashInferPagedAttention


def _spans(lengths):
    spans, row, block = [], 0, 0
    for prefix, new in lengths:
        blocks = -(-(prefix + new) // BLOCK)
        spans.append(SeqSpan(row, new, prefix + new, list(range(block + blocks - 1, block - 1, -1))))
        row, block = row + new, block + blocks
    return spans


def test_csr_of_a_step():
    layout = StepLayout.from_spans(_spans([(0, 5), (3, 1), (8, 8)]), BLOCK, "cpu", max_blocks=9)
    csr = paged_kv_csr(layout)
    assert csr["qo_indptr"].tolist() == [0, 5, 6, 14]
    assert csr["kv_indptr"].tolist() == [0, 2, 3, 7]
    assert csr["kv_indices"].tolist() == [1, 0, 2, 6, 5, 4, 3]
    assert csr["kv_last_page_len"].tolist() == [1, 4, 4]


@pytest.mark.parametrize("decode", [True, False])
def test_wiring_matches_torch_reference(flashinfer_backend, decode):
    geometry = ModelGeometry(1, KV_HEADS, DIM, 4096, 100, HEADS)
    ref = TorchPagedAttention(geometry, 40, BLOCK, torch.float32, "cpu")
    fast = flashinfer_backend(geometry, 40, BLOCK, torch.float32, "cpu")
    ref.kv_caches[0].normal_()
    fast.kv_caches[0].copy_(ref.kv_caches[0])
    lengths = [(9, 1), (30, 1), (0, 1)] if decode else [(6, 5), (0, 9), (12, 1)]
    spans = _spans(lengths)
    tokens = sum(new for _, new in lengths)
    q = torch.randn(1, tokens, HEADS, DIM).transpose(1, 2)
    k, v = (torch.randn(1, tokens, KV_HEADS, DIM).transpose(1, 2) for _ in range(2))
    for window, softcap in ((None, None), (5, 3.0)):
        outs = []
        for backend in (ref, fast):
            backend.plan(StepLayout.from_spans(spans, BLOCK, "cpu"))
            outs.append(backend.forward(0, q, k, v, 0.2, window, softcap))
            outs.append(backend.forward(0, q, k, v, 0.2, window, softcap))  # a second layer: no re-plan
        torch.testing.assert_close(outs[2], outs[0], rtol=1e-4, atol=1e-4)
    assert [p["decode"] for p in _Wrapper.plans] == [decode, decode]  # once per configuration per step
    assert [p["window_left"] for p in _Wrapper.plans] == [-1, 4]
    torch.testing.assert_close(fast.kv_caches[0], ref.kv_caches[0])


def test_unsupported_head_dim_is_refused_at_start(flashinfer_backend):
    from server.model.attention import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="head_dim"):
        flashinfer_backend(ModelGeometry(1, 2, 48, 512, 100, 4), 8, BLOCK, torch.float32, "cpu")


def test_auto_choice_and_refusals():
    assert attention_backend_class("auto", "cpu") is TorchPagedAttention
    assert available("flashinfer", "cpu") is not None
    with pytest.raises(ValueError, match="cannot run on cpu"):
        attention_backend_class("flashinfer", "cpu")
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention_backend_class("nope", "cpu")
