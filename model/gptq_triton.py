"""The fused Int4 product: AutoGPTQ's stored tensors (qweight, qzeros, scales, g_idx) read as they are,
with the same bits as the reference at every row count.

The reference is `kernels.matmul(x, W)` with W the GPTQ weight dequantized in fp32 (exact) and rounded
once to the model dtype (`GPTQLinear.dequantize().to(dtype)`). This kernel keeps the invariant matmul's
reduction order, the contract shared with model/kernels.py: an fp32 accumulator, K visited from 0 upward
in steps of `kernels.BLOCK_K`, each step one `tl.dot` of a [BLOCK_M, BLOCK_K] activation tile and a
[BLOCK_K, BLOCK_N] weight tile in the model dtype, bias added in fp32 after the loop, one cast at the end.
The weight tile is dequantized in registers to exactly the reference's values, so a row's output is the
reference's bit for bit, whatever the tile and however many rows share the call (K is never split).
Whether small tiles (mma.sync) and large ones (wgmma) round alike is a property of the GPU: bench/int4.py
checks every tiling of `TILES` against the reference there. Past DEQUANTIZE_ROWS rows (prefill) the
reference itself runs: the weight decoded by the same tile code into a [K, N] buffer, then kernels.matmul.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import kernels
from .kernels import BLOCK_K, grouped_tile


class Tile(NamedTuple):
    """Which outputs a program owns and how it walks K, never the order over K. "Weights first" computes
    out.T = W x.T (the dequantized tile as tl.dot's first operand, its N rows fill the instruction however
    few rows x has); `k_steps` K steps are decoded per loop iteration and then accumulated one after the
    other, so one row's program has several independent decodes in flight. Whether the GPU's instructions
    round alike for every tiling is bench/int4.py's to check."""
    block_m: int
    block_n: int
    warps: int
    stages: int
    weights_first: bool = False
    k_steps: int = 1


# By row count, smallest first: the first whose block_m covers the rows, else the last (up to DEQUANTIZE_ROWS).
# One row: block_m 16 (tl.dot's smallest) and narrow N tiles, so that even a 4096-wide projection gives 128
# programs to spread over 132 multiprocessors. The fastest at 1-16, 64 and 256 rows of the tilings that agreed
# everywhere on an H100 (bench/results/int4_bits_continuations_h100.json, 2026-12-07).
TILES = (Tile(16, 32, 4, 4), Tile(64, 32, 4, 6), Tile(64, 128, 4, 4))
# Past this many rows the weight is decoded once into the model dtype and multiplied by kernels.matmul: the
# reference by definition, and at prefill sizes the decode is small beside the product (bench/int4.py times
# both at each row count)
DEQUANTIZE_ROWS = 512


@triton.jit
def _plus_2_23(nibble):
    """2^23 + a value in 0..15 as fp32, by setting the exponent bits: exact, and cheaper than an int->float
    conversion (conversions run at a fraction of the arithmetic rate, and decoding does one per weight)."""
    return (nibble | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _dequantized_tile(qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, k_start, offs_n, mask_n, N, K,
                      GROUP_SIZE: tl.constexpr, ACT_ORDER: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_N: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """W[k_start : k_start + BLOCK_K, offs_n] in OUT_DTYPE (zero past K), from BLOCK_K / 8 words per column."""
    rows = k_start // 8 + tl.arange(0, BLOCK_K // 8)
    words = tl.load(qweight_ptr + rows[:, None] * N + offs_n[None, :], mask=(rows[:, None] < K // 8) & mask_n[None, :],
                    other=0)
    nibble = tl.arange(0, 8) * 4  # input channel 8r + j sits in bits 4j..4j+3 of word row r
    codes = _plus_2_23(tl.reshape((words[:, None, :] >> nibble[None, :, None]) & 0xF, (BLOCK_K, BLOCK_N)))
    offs_k = k_start + tl.arange(0, BLOCK_K)
    zero_shift = (offs_n % 8) * 4
    if ACT_ORDER or GROUP_SIZE % BLOCK_K != 0:  # a group per input channel
        if ACT_ORDER:
            group = tl.load(g_idx_ptr + offs_k, mask=offs_k < K, other=0)[:, None]
        else:
            group = (offs_k // GROUP_SIZE)[:, None]
        scale = tl.load(scales_ptr + group * N + offs_n[None, :], mask=mask_n[None, :], other=0.0)
        zword = tl.load(qzeros_ptr + group * (N // 8) + offs_n[None, :] // 8, mask=mask_n[None, :], other=0)
        zero = _plus_2_23((zword >> zero_shift[None, :]) & 0xF) + 1.0  # stored minus one
    else:  # the tile lies inside one group: one row of scales and zeros
        group = k_start // GROUP_SIZE
        scale = tl.load(scales_ptr + group * N + offs_n, mask=mask_n, other=0.0)[None, :]
        zword = tl.load(qzeros_ptr + group * (N // 8) + offs_n // 8, mask=mask_n, other=0)
        zero = (_plus_2_23((zword >> zero_shift) & 0xF) + 1.0)[None, :]
    # code - zero is exact (two integers near 2^23), and so is its product with an fp16 scale (5 + 11 bits)
    exact = (codes - zero) * scale.to(tl.float32)
    exact = tl.where(offs_k[:, None] < K, exact, 0.0)  # as the reference's masked load past K
    return exact.to(OUT_DTYPE, fp_downcast_rounding="rtne")  # one rounding, as torch's .to(dtype)


@triton.jit
def _k_step(acc, x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, k_start, offs_m, mask_m, offs_n, mask_n, N,
            K, stride_xm, GROUP_SIZE: tl.constexpr, ACT_ORDER: tl.constexpr, BLOCK_K: tl.constexpr,
            BLOCK_N: tl.constexpr, WEIGHTS_FIRST: tl.constexpr):
    """acc + x[:, k_start : k_start + BLOCK_K] @ W[k_start : k_start + BLOCK_K]: one step of the contract."""
    offs_k = k_start + tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & (offs_k[None, :] < K),
                other=0.0)
    w = _dequantized_tile(qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, k_start, offs_n, mask_n, N, K, GROUP_SIZE,
                          ACT_ORDER, BLOCK_K, BLOCK_N, x_ptr.dtype.element_ty)
    # an if/else, not an early return: compiled Triton goes on past a return inside a constexpr if
    if WEIGHTS_FIRST:
        acc = tl.dot(tl.trans(w), tl.trans(x), acc)
    else:
        acc = tl.dot(x, w, acc)
    return acc


@triton.jit(do_not_specialize=["M"])  # one compiled kernel for every row count
def _matmul_kernel(x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, bias_ptr, out_ptr, M, N, K, stride_xm,
                   stride_om, GROUP_SIZE: tl.constexpr, ACT_ORDER: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   WEIGHTS_FIRST: tl.constexpr, K_STEPS: tl.constexpr):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    if WEIGHTS_FIRST:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # the contract: K from 0 upward, one tl.dot per BLOCK_K step; K_STEPS steps per iteration, then the rest
    # one at a time (never a step past K: adding its zeros could turn a -0.0 sum into +0.0)
    k_whole = K - K % (BLOCK_K * K_STEPS)
    for k_outer in range(0, k_whole, BLOCK_K * K_STEPS):
        for step in tl.static_range(K_STEPS):
            acc = _k_step(acc, x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, k_outer + step * BLOCK_K,
                          offs_m, mask_m, offs_n, mask_n, N, K, stride_xm, GROUP_SIZE, ACT_ORDER, BLOCK_K, BLOCK_N,
                          WEIGHTS_FIRST)
    for k_start in range(k_whole, K, BLOCK_K):
        acc = _k_step(acc, x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, k_start, offs_m, mask_m, offs_n,
                      mask_n, N, K, stride_xm, GROUP_SIZE, ACT_ORDER, BLOCK_K, BLOCK_N, WEIGHTS_FIRST)
    if WEIGHTS_FIRST:
        acc = tl.trans(acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _dequantize_kernel(qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, out_ptr, N, K, GROUP_SIZE: tl.constexpr,
                       ACT_ORDER: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    k_start, offs_n = tl.program_id(0) * BLOCK_K, tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w = _dequantized_tile(qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, k_start, offs_n, mask_n, N, K, GROUP_SIZE,
                          ACT_ORDER, BLOCK_K, BLOCK_N, out_ptr.dtype.element_ty)
    offs_k = k_start + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w, mask=(offs_k[:, None] < K) & mask_n[None, :])


def dequantize(qweight: Tensor, scales: Tensor, qzeros: Tensor, g_idx: Tensor, group_size: int, act_order: bool,
               dtype: torch.dtype) -> Tensor:
    """W [K, N] in dtype: the reference's weight (exact in fp32, rounded once), decoded as the fused kernel does."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    out = torch.empty(k, n, dtype=dtype, device=qweight.device)
    block_n = 64
    kernels.launch(_dequantize_kernel, (triton.cdiv(k, BLOCK_K), triton.cdiv(n, block_n)), out, qweight, scales,
                   qzeros, g_idx, out, n, k, GROUP_SIZE=group_size, ACT_ORDER=act_order, BLOCK_K=BLOCK_K,
                   BLOCK_N=block_n)
    return out


def tile_for(m: int) -> Tile:
    """The tiling for m rows."""
    return next((tile for tile in TILES if m <= tile.block_m), TILES[-1])


def gptq_matmul(x: Tensor, qweight: Tensor, scales: Tensor, qzeros: Tensor, g_idx: Tensor, group_size: int,
                act_order: bool, bias: Tensor | None = None, tile: Tile | None = None) -> Tensor:
    """x [M, K] (bf16 or fp16, unit stride along K) @ W + bias -> [M, N] in x's dtype. Without a tile, more
    than DEQUANTIZE_ROWS rows take the reference itself: the weight decoded once, then `kernels.matmul`."""
    m, k = x.shape
    n = qweight.shape[1]
    if tile is None and m > DEQUANTIZE_ROWS:
        weight = dequantize(qweight, scales, qzeros, g_idx, group_size, act_order, x.dtype)
        return kernels.matmul(x, weight.t(), bias)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    tile = tile or tile_for(m)
    grid = (triton.cdiv(m, tile.block_m) * triton.cdiv(n, tile.block_n),)
    kernels.launch(_matmul_kernel, grid, x, x, qweight, scales, qzeros, g_idx, bias if bias is not None else scales,
                   out, m, n, k, x.stride(0), out.stride(0), GROUP_SIZE=group_size, ACT_ORDER=act_order,
                   HAS_BIAS=bias is not None, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=BLOCK_K,
                   GROUP_M=8, WEIGHTS_FIRST=tile.weights_first, K_STEPS=tile.k_steps, num_warps=tile.warps,
                   num_stages=tile.stages)
    return out
