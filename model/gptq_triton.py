"""Triton kernels that read AutoGPTQ's layout as stored (qweight, qzeros, scales, g_idx): no repacking.

Both compute the reference weight exactly: W[k, n] = (code - zero) * scale in fp32 (exact: a 5-bit integer
times an fp16 scale), rounded once to the activation dtype, as `GPTQLinear.dequantize().to(dtype)` does.
- `gptq_matmul`: x [M, K] @ W -> [M, N] for few rows (decoding). Each program unpacks a [BLOCK_K, BLOCK_N]
  tile once and multiplies it on the tensor cores with fp32 accumulation; K is split over SPLIT_K programs
  whose fp32 partial sums are added by one `sum` (no atomics: the same inputs give the same bits). SPLIT_K
  depends on the layer's shape only, so a row's result does not depend on how many rows share the call.
- `gptq_dequantize`: W as a dense [K, N] tensor, for prefill, where cuBLAS on the dense weight is faster.
So the fused product differs from the reference only in the order of its fp32 additions.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_M = 16  # the smallest tensor-core tile; decoding batches are at most a few tiles
PROGRAMS_PER_SM = 4  # enough loads in flight per multiprocessor to keep HBM busy


@triton.jit
def _load_dequantized(qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, k_start, offs_n, mask_n, N,
                      GROUP_SIZE: tl.constexpr, ACT_ORDER: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_N: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """W[k_start : k_start + BLOCK_K, offs_n] in OUT_DTYPE, from one load of BLOCK_K / 8 words per column."""
    rows = k_start // 8 + tl.arange(0, BLOCK_K // 8)
    words = tl.load(qweight_ptr + rows[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
    nibble = tl.arange(0, 8) * 4  # input channel 8r + j sits in bits 4j..4j+3 of word row r
    codes = tl.reshape((words[:, None, :] >> nibble[None, :, None]) & 0xF, (BLOCK_K, BLOCK_N))
    zero_shift = (offs_n % 8) * 4
    if ACT_ORDER:  # groups follow g_idx channel by channel
        group = tl.load(g_idx_ptr + k_start + tl.arange(0, BLOCK_K))[:, None]
        scale = tl.load(scales_ptr + group * N + offs_n[None, :], mask=mask_n[None, :], other=0.0)
        zword = tl.load(qzeros_ptr + group * (N // 8) + offs_n[None, :] // 8, mask=mask_n[None, :], other=0)
        zero = ((zword >> zero_shift[None, :]) & 0xF) + 1  # stored minus one
    else:  # the tile lies inside one group (BLOCK_K divides GROUP_SIZE)
        group = k_start // GROUP_SIZE
        scale = tl.load(scales_ptr + group * N + offs_n, mask=mask_n, other=0.0)[None, :]
        zword = tl.load(qzeros_ptr + group * (N // 8) + offs_n // 8, mask=mask_n, other=0)
        zero = (((zword >> zero_shift) & 0xF) + 1)[None, :]
    exact = (codes - zero).to(tl.float32) * scale.to(tl.float32)
    return exact.to(OUT_DTYPE, fp_downcast_rounding="rtne")  # one rounding, as torch's .to(dtype)


@triton.jit
def _matmul_kernel(x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, partial_ptr, M, N, K, stride_xm,
                   TILES_PER_SPLIT: tl.constexpr, GROUP_SIZE: tl.constexpr, ACT_ORDER: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, TILES_PER_SPLIT):
        k_start = (pid_k * TILES_PER_SPLIT + i) * BLOCK_K
        if k_start < K:  # the last split may hold fewer tiles
            offs_k = k_start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None], other=0.0)
            w = _load_dequantized(qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, k_start, offs_n, mask_n, N,
                                  GROUP_SIZE, ACT_ORDER, BLOCK_K, BLOCK_N, x_ptr.dtype.element_ty)
            acc = tl.dot(x, w, acc)
    out = partial_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _dequantize_kernel(qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, out_ptr, N,
                       GROUP_SIZE: tl.constexpr, ACT_ORDER: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k_start = pid_k * BLOCK_K
    w = _load_dequantized(qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, k_start, offs_n, mask_n, N,
                          GROUP_SIZE, ACT_ORDER, BLOCK_K, BLOCK_N, out_ptr.dtype.element_ty)
    offs_k = k_start + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w, mask=mask_n[None, :])


def block_k(in_features: int, group_size: int, act_order: bool) -> int | None:
    """The K tile: it divides K and lies inside one group unless groups are read per channel; None: none fits."""
    for size in (128, 64, 32, 16):
        if in_features % size == 0 and (act_order or group_size % size == 0):
            return size
    return None


def split_k(n: int, k_tiles: int, block_n: int, device: torch.device) -> int:
    """Programs along K so that the grid covers every multiprocessor a few times (from the shape alone)."""
    # a CPU tensor only reaches here under TRITON_INTERPRET=1 (the tests): pretend to 8 multiprocessors
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return max(1, min(k_tiles, round(PROGRAMS_PER_SM * sms / triton.cdiv(n, block_n))))


def gptq_matmul(x: Tensor, qweight: Tensor, scales: Tensor, qzeros: Tensor, g_idx: Tensor, group_size: int,
                act_order: bool, bias: Tensor | None = None, block_n: int = 64, num_warps: int = 4,
                num_stages: int = 3) -> Tensor:
    """x [M, K] (bf16 or fp16, contiguous rows) @ W + bias -> [M, N] in x's dtype; bias added in fp32."""
    m, k = x.shape
    n = qweight.shape[1]
    bk = block_k(k, group_size, act_order)
    k_tiles = k // bk
    splits = split_k(n, k_tiles, block_n, x.device)
    tiles_per_split = triton.cdiv(k_tiles, splits)
    splits = triton.cdiv(k_tiles, tiles_per_split)  # no empty split
    partial = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, BLOCK_M), splits)
    _matmul_kernel[grid](x, qweight, scales, qzeros, g_idx, partial, m, n, k, x.stride(0), tiles_per_split,
                         GROUP_SIZE=group_size, ACT_ORDER=act_order, BLOCK_M=BLOCK_M, BLOCK_N=block_n,
                         BLOCK_K=bk, num_warps=num_warps, num_stages=num_stages)
    y = partial[0] if splits == 1 else partial.sum(0)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def gptq_dequantize(qweight: Tensor, scales: Tensor, qzeros: Tensor, g_idx: Tensor, group_size: int,
                    act_order: bool, dtype: torch.dtype, block_n: int = 128) -> Tensor:
    """W [K, N] in `dtype`: the reference weight, each element rounded once from its exact fp32 value."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    bk = block_k(k, group_size, act_order)
    out = torch.empty(k, n, dtype=dtype, device=qweight.device)
    grid = (triton.cdiv(n, block_n), k // bk)
    _dequantize_kernel[grid](qweight, scales, qzeros, g_idx, out, n, GROUP_SIZE=group_size, ACT_ORDER=act_order,
                             BLOCK_N=block_n, BLOCK_K=bk)
    return out
