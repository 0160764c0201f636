"""SGMV in Triton: one segment-GEMM kernel run twice, as shrink (x @ A into an fp32 [N, R] buffer)
and as expand (y += t @ B), with one program per (row block, column block, segment).

Segments come from ``LoRABatch`` (only rows that use an adapter), so base-model rows launch nothing.
The kernels are decorated at import, when triton reads ``TRITON_INTERPRET``: the same code runs
compiled on CUDA and interpreted on CPU in tests. Accumulation is fp32; fp32 inputs use IEEE dots
(no TF32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from server.lora.batch import LoRABatch


@triton.jit
def _segment_rows(seg_ptr, num_segs, BLOCK_M: tl.constexpr, rows_axis: tl.constexpr, seg_axis: tl.constexpr):
    """This program's block of rows of its segment (``seg_ptr`` is the [3, num_segs] table of starts,
    lengths and slots): the rows, their mask, the segment's slot, and whether the block has any row."""
    seg = tl.program_id(seg_axis)
    first = tl.program_id(rows_axis) * BLOCK_M
    length = tl.load(seg_ptr + num_segs + seg)
    start = tl.load(seg_ptr + seg).to(tl.int64)
    slot = tl.load(seg_ptr + 2 * num_segs + seg).to(tl.int64)
    offs_m = first + tl.arange(0, BLOCK_M)
    return start + offs_m, offs_m < length, slot, first < length


@triton.jit
def _segment_gemm(
    x_ptr, w_ptr, out_ptr, seg_ptr, num_segs, pages_ptr, num_blocks, K, N,
    stride_xm, stride_xk, stride_wpage, stride_wk, stride_wn, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PAGED_K: tl.constexpr,
    ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr,
):  # fmt: skip
    """out[rows, cols] (+)= x[rows, :K] @ W[slot][:K, cols] for one (row block, column block) of one
    segment; grid (row blocks, column blocks, segments). Shrink and expand are both this: x @ A into
    the fp32 rank buffer, then y += t @ B. W is paged along its rank dimension: rank q of the slot sits
    in page ``pages[slot, q // 16]`` at position ``q % 16`` (``pages_ptr``: the [slots, num_blocks]
    page table). The rank is W's column dimension in the shrink (A: ``[in, rank]``) and its row
    dimension in the expand (``PAGED_K``; B: ``[rank, out]``). Accumulates in fp32; each output tile
    has one owner. ``WIDEN``: half-width weights under a float32 model, widened to fp32 for the dot
    (else x is cast to the weights' dtype)."""
    rows, mask_m, slot, active = _segment_rows(seg_ptr, num_segs, BLOCK_M, 0, 2)
    if active:
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        slot_pages = pages_ptr + slot * num_blocks
        if not PAGED_K:  # the columns are ranks: their pages are fixed for the whole tile
            page_n = tl.load(slot_pages + offs_n // 16, mask=mask_n, other=0).to(tl.int64)
            w_cols = page_n * stride_wpage + (offs_n % 16) * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x_tile = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
            x = tl.load(x_tile, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            if PAGED_K:
                page_k = tl.load(slot_pages + offs_k // 16, mask=mask_k, other=0).to(tl.int64)
                w_tile = (
                    w_ptr
                    + (page_k * stride_wpage + (offs_k % 16) * stride_wk)[:, None]
                    + (offs_n * stride_wn)[None, :]
                )
            else:
                w_tile = w_ptr + (offs_k * stride_wk)[:, None] + w_cols[None, :]
            w = tl.load(w_tile, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if WIDEN:
                acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision=PRECISION)
            else:
                acc += tl.dot(x.to(w.dtype), w, input_precision=PRECISION)
        out_tile = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
        mask = mask_m[:, None] & mask_n[None, :]
        if ACCUMULATE:
            acc += tl.load(out_tile, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_tile, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def sgmv_triton(
    y: torch.Tensor,
    x: torch.Tensor,
    a_pages: torch.Tensor,
    b_pages: torch.Tensor,
    page_table: torch.Tensor,
    rank: int,
    batch: LoRABatch,
) -> None:
    """``y[s:e] += (x[s:e] @ A[slot]) @ B[slot]`` per segment of ``batch``, over the slots' first
    ``rank`` ranks (a multiple of 16): A in pages [pages, in, 16] (one member's view of
    ``SlotWeights.a``), B in pages [pages, 16, out], ``page_table`` [slots, R/16] int64 (ranks a slot
    does not have read the zero page or zeros, and contribute nothing)."""
    if not batch.segments and not batch.static:
        return
    segments = batch.segment_table(x.device)  # [3, capacity]: the kernel's row stride is the capacity
    table_stride, num_segments = segments.shape[1], batch.launch_segments
    k, n_out = x.shape[1], y.shape[1]
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    widen = x.dtype == torch.float32 and a_pages.dtype != torch.float32
    block_m = _block(batch.max_segment_len, 16, 64)
    block_r = _block(rank, 16, 256)
    block_out = _block(n_out, 16, 64)
    rows_grid = triton.cdiv(batch.max_segment_len, block_m)
    shrunk = torch.empty((x.shape[0], rank), dtype=torch.float32, device=x.device)
    a, b = a_pages, b_pages
    a_strides = (a.stride(0), a.stride(1), a.stride(2))  # page, in, rank in page
    b_strides = (b.stride(0), b.stride(1), b.stride(2))  # page, rank in page, out
    for inp, weights, strides, out, k_dim, n_dim, block_n, block_k, paged_k, accumulate in (
        (x, a, a_strides, shrunk, k, rank, block_r, _block(k, 16, 64), False, False),  # shrink: t = x @ A
        (shrunk, b, b_strides, y, rank, n_out, block_out, block_r, True, True),  # expand: y += t @ B
    ):
        grid = (rows_grid, triton.cdiv(n_dim, block_n), num_segments)
        _segment_gemm[grid](
            inp, weights, out, segments, table_stride, page_table, page_table.shape[1], k_dim, n_dim,
            *inp.stride(), *strides, *out.stride(),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PAGED_K=paged_k, ACCUMULATE=accumulate,
            PRECISION=precision, WIDEN=widen,
        )  # fmt: skip
