"""SGMV in Triton: a shrink kernel (x @ A into an fp32 [N, R] buffer) and an expand kernel
(y += t @ B), each with one program per (row block, [column block,] segment).

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
def _segment_rows(starts_ptr, lens_ptr, slots_ptr, seg, pid_m, BLOCK_M: tl.constexpr):
    """Rows of this program's block of segment ``seg``, their mask, the segment's slot, and whether
    the block holds any row at all."""
    length = tl.load(lens_ptr + seg)
    start = tl.load(starts_ptr + seg).to(tl.int64)
    slot = tl.load(slots_ptr + seg).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return start + offs_m, offs_m < length, slot, pid_m * BLOCK_M < length


@triton.jit
def _shrink(
    x_ptr, a_ptr, t_ptr, starts_ptr, lens_ptr, slots_ptr,
    K, R,
    stride_xm, stride_xk, stride_as, stride_ak, stride_ar, stride_tm, stride_tr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """t[rows, :R] = x[rows] @ A[slot, :, :R] for one block of one segment's rows (any A strides)."""
    rows, mask_m, slot, active = _segment_rows(
        starts_ptr, lens_ptr, slots_ptr, tl.program_id(1), tl.program_id(0), BLOCK_M
    )
    if active:
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x_tile = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
            x = tl.load(x_tile, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            a_tile = a_ptr + slot * stride_as + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar
            a = tl.load(a_tile, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            acc += tl.dot(x, a, input_precision=PRECISION)
        t_tile = t_ptr + rows[:, None] * stride_tm + offs_r[None, :] * stride_tr
        tl.store(t_tile, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _expand(
    t_ptr, b_ptr, y_ptr, starts_ptr, lens_ptr, slots_ptr,
    N_OUT, R,
    stride_tm, stride_tr, stride_bs, stride_br, stride_bn, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """y[rows, cols] += t[rows, :R] @ B[slot, :R, cols]; each (row, col) tile has one owner."""
    rows, mask_m, slot, active = _segment_rows(
        starts_ptr, lens_ptr, slots_ptr, tl.program_id(2), tl.program_id(0), BLOCK_M
    )
    if active:
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N_OUT
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        t_tile = t_ptr + rows[:, None] * stride_tm + offs_r[None, :] * stride_tr
        t = tl.load(t_tile, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        b_tile = b_ptr + slot * stride_bs + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn
        b = tl.load(b_tile, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        delta = tl.dot(t.to(b.dtype), b, input_precision=PRECISION)
        y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
        mask = mask_m[:, None] & mask_n[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=mask)


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def sgmv_triton(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: torch.Tensor,
    lora_b_stacked: torch.Tensor,
    batch: LoRABatch,
) -> None:
    """``y[s:e] += (x[s:e] @ A[slot]) @ B[slot]`` per segment of ``batch``; A [slots, in, rank],
    B [slots, rank, out] (padded ranks contribute zeros)."""
    if not batch.segments:
        return
    starts, lens, slots = batch.device_tensors(x.device)
    num_segments = len(batch.segments)
    rank, k, n_out = lora_a_stacked.shape[2], x.shape[1], y.shape[1]
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    block_m = _block(batch.max_segment_len, 16, 64)
    block_r = _block(rank, 16, 256)
    block_n = _block(n_out, 16, 64)
    rows_grid = triton.cdiv(batch.max_segment_len, block_m)
    shrunk = torch.empty((x.shape[0], rank), dtype=torch.float32, device=x.device)
    _shrink[(rows_grid, num_segments)](
        x, lora_a_stacked, shrunk, starts, lens, slots,
        k, rank,
        *x.stride(), *lora_a_stacked.stride(), *shrunk.stride(),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=_block(k, 16, 64), PRECISION=precision,
    )  # fmt: skip
    _expand[(rows_grid, triton.cdiv(n_out, block_n), num_segments)](
        shrunk, lora_b_stacked, y, starts, lens, slots,
        n_out, rank,
        *shrunk.stride(), *lora_b_stacked.stride(), *y.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, PRECISION=precision,
    )  # fmt: skip
