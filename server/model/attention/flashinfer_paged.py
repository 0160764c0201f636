"""Paged attention through FlashInfer's batch wrappers (``flashinfer-python``), when it is installed.

FlashInfer describes a paged batch in CSR form: ``qo_indptr`` (query rows per sequence),
``kv_indptr``/``kv_indices`` (each sequence's pages, in order) and ``kv_last_page_len``. ``plan`` builds
those once per step from the layout's host mirrors (no device reads), and each wrapper's own ``plan``
(FlashInfer's scheduling, host work plus one copy) runs once per step per distinct attention
configuration (scale, sliding window, soft-cap: FlashInfer fixes them at plan time, and a model may
mix them across layers); ``run`` is then called per layer. Pure decode steps use the decode wrapper,
any other step the prefill wrapper over the whole packed batch. The cache layout is FlashInfer's
"NHD": K and V each ``[num_pages, page_size, kv_heads, head_dim]``.

Written against FlashInfer's documented ``plan``/``run`` API (0.2 and later). This backend runs
eagerly (``supports_cuda_graphs`` is False: FlashInfer's graph mode needs a wrapper per batch size
with its own buffers, not done here), so decode graphs are captured with the Triton backend.
"""

from __future__ import annotations

import importlib

import torch

from server.model.attention.base import AttentionBackend, StepLayout, UnsupportedModelError

WORKSPACE_BYTES = 128 * 2**20  # FlashInfer's documented default per wrapper
HEAD_DIMS = (64, 128, 256)


def paged_kv_csr(layout: StepLayout) -> dict[str, torch.Tensor]:
    """The step in FlashInfer's CSR terms, from host tensors (int32, on the CPU)."""
    host, n = layout.host, layout.num_seqs
    ctx = host.context_lens[:n].to(torch.int32)
    pages = (ctx + layout.block_size - 1) // layout.block_size
    kv_indptr = torch.zeros(n + 1, dtype=torch.int32)
    kv_indptr[1:] = torch.cumsum(pages, 0)
    tables = host.block_tables[:n]
    used = torch.arange(tables.shape[1])[None, :] < pages[:, None]
    return {
        "qo_indptr": host.query_start[: n + 1].to(torch.int32),
        "kv_indptr": kv_indptr,
        "kv_indices": tables[used].to(torch.int32),  # row-major: each sequence's pages, in order
        "kv_last_page_len": ctx - (pages - 1) * layout.block_size,
    }


class FlashInferPagedAttention(AttentionBackend):
    """Cache layout per layer: [2 (K, V), num_pages, page_size, kv_heads, head_dim] (FlashInfer NHD)."""

    name = "flashinfer"
    supports_cuda_graphs = False

    def check_model(self, geometry) -> None:
        if geometry.head_dim not in HEAD_DIMS:
            raise UnsupportedModelError(
                f"attention backend 'flashinfer' supports head_dim in {HEAD_DIMS}, the model has "
                f"{geometry.head_dim}; use --attention-backend triton"
            )
        self._flashinfer = importlib.import_module("flashinfer")
        self._wrappers: dict[tuple, object] = {}

    def plan(self, layout: StepLayout) -> None:
        self.layout = layout
        self.csr = paged_kv_csr(layout)
        self.slots = layout.device.slot_mapping[: layout.num_tokens].long()
        self._planned: dict[tuple, object] = {}

    def forward(self, layer_idx, query, key, value, scaling, sliding_window, softcap) -> torch.Tensor:
        cache = self.kv_caches[layer_idx]
        kv_heads, head_dim = cache.shape[3], cache.shape[4]
        cache[0].view(-1, kv_heads, head_dim).index_copy_(0, self.slots, key[0].transpose(0, 1))
        cache[1].view(-1, kv_heads, head_dim).index_copy_(0, self.slots, value[0].transpose(0, 1))
        q = query[0].transpose(0, 1).contiguous()  # [T, H, D]
        wrapper = self._wrapper(q.shape[1], scaling, sliding_window, softcap, q.dtype)
        return wrapper.run(q, (cache[0], cache[1])).unsqueeze(0)

    def _wrapper(self, num_heads: int, scaling, sliding_window, softcap, dtype):
        """The wrapper for this step's kind and this layer's attention configuration, planned once per
        step (the first layer with a configuration plans it; the others reuse it)."""
        decode = self.layout.is_decode
        key = (decode, scaling, sliding_window, softcap)
        planned = self._planned.get(key)
        if planned is None:
            planned = self._planned[key] = self._wrappers.get(key) or self._new_wrapper(key, num_heads)
            g, csr = self.geometry, self.csr
            common = dict(
                window_left=(sliding_window - 1) if sliding_window else -1,
                logits_soft_cap=softcap,
                sm_scale=scaling,
                q_data_type=dtype,
                kv_data_type=self.kv_caches[0].dtype,
            )
            pages = (csr["kv_indptr"], csr["kv_indices"], csr["kv_last_page_len"])
            shape = (num_heads, g.num_kv_heads, g.head_dim, self.block_size)
            if decode:
                planned.plan(*pages, *shape, **common)
            else:
                planned.plan(csr["qo_indptr"], *pages, *shape, causal=True, **common)
        return planned

    def _new_wrapper(self, key: tuple, num_heads: int):
        workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        fi = self._flashinfer
        if key[0]:
            wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(
                workspace, "NHD", use_tensor_cores=num_heads // self.geometry.num_kv_heads > 4
            )
        else:
            wrapper = fi.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
        self._wrappers[key] = wrapper
        return wrapper
