"""SGMV in Triton: a shrink kernel (x @ A^T into an fp32 [N, R] buffer) and an expand kernel
(y += t @ B^T), each with one program per (row block, [column block,] segment).

Segments come from ``LoRABatch`` (only rows that use an adapter), so base-model rows launch nothing.
Kernels are JIT-wrapped lazily and keyed by ``TRITON_INTERPRET`` so the same code runs compiled on
CUDA and interpreted on CPU in tests. Accumulation is fp32; fp32 inputs use IEEE dots (no TF32).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton import knobs

from server.lora.batch import LoRABatch


def _shrink(
    x_ptr, a_ptr, t_ptr, starts_ptr, lens_ptr, slots_ptr,
    K, R,
    stride_xm, stride_xk, stride_as, stride_ar, stride_ak, stride_tm, stride_tr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """t[rows, :R] = x[rows] @ A[slot, :, :R] for one block of one segment's rows (any A strides)."""
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    length = tl.load(lens_ptr + seg)
    if pid_m * BLOCK_M < length:
        start = tl.load(starts_ptr + seg).to(tl.int64)
        slot = tl.load(slots_ptr + seg).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < length
        rows = start + offs_m
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(
                x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )
            a = tl.load(
                a_ptr + slot * stride_as + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                mask=mask_r[:, None] & mask_k[None, :],
                other=0.0,
            )
            acc += tl.dot(x, tl.trans(a), input_precision=PRECISION)
        tl.store(
            t_ptr + rows[:, None] * stride_tm + offs_r[None, :] * stride_tr,
            acc,
            mask=mask_m[:, None] & mask_r[None, :],
        )


def _expand(
    t_ptr, b_ptr, y_ptr, starts_ptr, lens_ptr, slots_ptr,
    N_OUT, R,
    stride_tm, stride_tr, stride_bs, stride_bn, stride_br, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """y[rows, cols] += t[rows, :R] @ B[slot, :R, cols]; each (row, col) tile has one owner."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    seg = tl.program_id(2)
    length = tl.load(lens_ptr + seg)
    if pid_m * BLOCK_M < length:
        start = tl.load(starts_ptr + seg).to(tl.int64)
        slot = tl.load(slots_ptr + seg).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < length
        rows = start + offs_m
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N_OUT
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        t = tl.load(
            t_ptr + rows[:, None] * stride_tm + offs_r[None, :] * stride_tr,
            mask=mask_m[:, None] & mask_r[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + slot * stride_bs + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
            mask=mask_n[:, None] & mask_r[None, :],
            other=0.0,
        )
        delta = tl.dot(t.to(b.dtype), tl.trans(b), input_precision=PRECISION)
        y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
        mask = mask_m[:, None] & mask_n[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=mask)


@functools.cache
def _kernels(interpret: bool):
    """JIT wrappers built on first use; ``interpret`` keys the cache (triton decides at decoration)."""
    del interpret  # only a cache key: triton.jit reads TRITON_INTERPRET itself
    return triton.jit(_shrink), triton.jit(_expand)


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def sgmv_triton(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: torch.Tensor,
    lora_b_stacked: torch.Tensor,
    batch: LoRABatch,
) -> None:
    """Same semantics and shapes as ``server.lora.ops.add_lora`` (padded ranks contribute zeros)."""
    if not batch.segments:
        return
    shrink, expand = _kernels(knobs.runtime.interpret)
    starts, lens, slots = batch.device_tensors(x.device)
    num_segments = len(batch.segments)
    rank, k = lora_a_stacked.shape[2], x.shape[1]
    a_s, a_k, a_r = lora_a_stacked.stride()  # [slots, in, rank]
    b_s, b_r, b_n = lora_b_stacked.stride()  # [slots, rank, out]
    n_out = y.shape[1]
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    block_m = _block(batch.max_segment_len, 16, 64)
    block_r = _block(rank, 16, 256)
    block_k = _block(k, 16, 64)
    block_n = _block(n_out, 16, 64)
    rows_grid = triton.cdiv(batch.max_segment_len, block_m)
    shrunk = torch.empty((x.shape[0], rank), dtype=torch.float32, device=x.device)
    shrink[(rows_grid, num_segments)](
        x, lora_a_stacked, shrunk, starts, lens, slots,
        k, rank,
        x.stride(0), x.stride(1), a_s, a_r, a_k, shrunk.stride(0), shrunk.stride(1),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, PRECISION=precision,
    )  # fmt: skip
    expand[(rows_grid, triton.cdiv(n_out, block_n), num_segments)](
        shrunk, lora_b_stacked, y, starts, lens, slots,
        n_out, rank,
        shrunk.stride(0), shrunk.stride(1), b_s, b_n, b_r, y.stride(0), y.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, PRECISION=precision,
    )  # fmt: skip
