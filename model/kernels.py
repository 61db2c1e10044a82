"""Batch-invariant GPU kernels: what a row computes never depends on the other rows.

Library kernels choose their tiling, split-K and split-KV from the whole batch's shape, so a document's
logits change with its neighbours (Thinking Machines, "Defeating Nondeterminism in LLM Inference", 2025).
Here every reduction has one order per row, whatever the batch:
- matmul (Triton): fp32 accumulation over K in fixed BLOCK_K steps, never split; the M/N tile only
  decides which outputs a program owns. This K order is the contract the Int4 kernel shares;
- linear: cuBLASLt with split-K impossible (no workspace for partial sums, pin_library_matmuls): its
  kernels differ only in which outputs a block owns, at the library's speed; bench/kernel_bits.py proves
  it per weight shape and row count on the GPU (BF16 layers use it; the Int4 kernel keeps matmul's order);
- add_rms_norm: one program per row, one block size;
- attention: keys are visited in blocks of BLOCK_N aligned at logical key index 0, where the logical
  index runs over a shared prefix [H, P, D] and then the row's own keys. Because the engine stores a
  row's own key s at position P + s, a document scores the same with its prefix shared or in its own
  prompt. Blocks a row cannot see add exact zeros, so skipping them or not changes no bit;
- decode_attention (one query per row): the logical keys are cut into splits of DECODE_SPLIT keys,
  also aligned at 0, each split reduced by its own program and the splits combined in index order.
  Splits past a row's last visible key are exact zeros, so the cache capacity changes no bit.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# Every launch asks for FMA contraction (a * b + c in one rounding) itself rather than taking Triton's default,
# which Triton 3.10 turns off: a Triton upgrade must not move the last bits a kernel gives.
FP_FUSION = True


def launch(kernel, grid: tuple, on: Tensor, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) on `on`'s GPU (Triton takes the current device's stream, which is GPU 0
    unless set), with FMA contraction pinned (FP_FUSION): every Triton launch of the model goes through here."""
    with torch.cuda.device(on.device) if on.is_cuda else contextlib.nullcontext():
        kernel[grid](*args, enable_fp_fusion=FP_FUSION, **kwargs)


BLOCK_K = 64  # the one K step of every matmul: the reduction order of a dot product
ATTN_BLOCK_N = 64  # the one key-block size of attention
DECODE_SPLIT = 256  # keys per split of decode attention: a long cache is read by many programs at batch 1
DECODE_BLOCK_N = 64  # keys per step inside a split


# ---- matmul -------------------------------------------------------------------------------------------
@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of this program: programs of GROUP_M row blocks run together, so weight
    tiles stay in L2 (also gptq_triton's)."""
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    group_m = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % width) % group_m, (pid % width) // group_m


@triton.jit(do_not_specialize=["M"])  # one compiled kernel for every row count
def _matmul_kernel(a_ptr, w_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_wn, stride_wk,
                   stride_cm, stride_cn, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # M x N can pass 2**31 (LM head)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BLOCK_K, BLOCK_N] of w.T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k_left = K - k_start
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
        w = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def matmul_tile(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages) by row count: only which outputs a program owns, never the K order.

    The fastest of seven tilings measured on an H200 (bench/determinism.py --parts kernels), all of
    which gave identical bits."""
    if m <= 64:
        return 64, 64, 4, 4  # decoding: small tiles, enough programs to stream the weights
    if m <= 256:
        return 128, 128, 8, 3
    return 256, 128, 8, 3


def matmul(x: Tensor, weight: Tensor, bias: Tensor | None = None, tile: tuple | None = None) -> Tensor:
    """x [..., K] @ weight[N, K].T (+ bias) with one reduction order per output element."""
    a = x.reshape(-1, x.shape[-1])
    M, K = a.shape
    N = weight.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out.view(*x.shape[:-1], N)
    block_m, block_n, warps, stages = tile or matmul_tile(M)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    launch(_matmul_kernel, grid, x, a, weight, bias if bias is not None else weight, out, M, N, K, a.stride(0),
           a.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1), HAS_BIAS=bias is not None,
           IEEE=x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_K, GROUP_M=8,
           num_warps=warps, num_stages=stages)
    return out.view(*x.shape[:-1], N)


def pin_library_matmuls() -> None:
    """Leave cuBLAS(Lt) no way to split K: no workspace to hold partial sums, no reduced-precision
    reduction. Then its kernels for a weight shape differ only in which outputs a block owns, and a row's
    bits do not depend on how many rows are multiplied with it, at the library's speed (bench/kernel_bits.py
    proves both on the GPU, for every family shape at 1..1,024 rows and the engine's largest batch).
    Process-wide, and read by PyTorch when it first creates its handles: call it before the process's
    first product on a GPU (the invariant op set does, when the model is built)."""
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"
    os.environ["CUBLASLT_WORKSPACE_SIZE"] = "1"
    for flag in ("allow_bf16_reduced_precision_reduction", "allow_fp16_reduced_precision_reduction"):
        try:  # PyTorch 2.10+: (reduced precision, split-K)
            setattr(torch.backends.cuda.matmul, flag, (False, False))
        except (TypeError, ValueError):
            setattr(torch.backends.cuda.matmul, flag, False)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.preferred_blas_library("cublaslt")


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [..., K] @ weight[N, K].T (+ bias) through cuBLASLt pinned by pin_library_matmuls. The rows go
    in row-major and 16-byte aligned, as the proof multiplied them (cuBLAS picks kernels by alignment)."""
    a = x.reshape(-1, x.shape[-1])
    if a.stride() != (a.shape[1], 1) or a.data_ptr() % 16:
        a = a.clone(memory_format=torch.contiguous_format)
    return torch.nn.functional.linear(a, weight, bias).view(*x.shape[:-1], weight.shape[0])


# ---- residual add + RMSNorm ---------------------------------------------------------------------------
@triton.jit
def _add_rms_norm_kernel(x_ptr, delta_ptr, w_ptr, sum_ptr, out_ptr, stride_x, stride_delta, stride_sum, stride_out, D,
                         eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    """One row: the residual x + delta rounded to the model dtype (stored), then its RMSNorm from that rounded
    sum, as the original's separate add and norm compute them."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < D, other=0.0)
    if HAS_DELTA:
        delta = tl.load(delta_ptr + row * stride_delta + cols, mask=cols < D, other=0.0)
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_sum + cols, x, mask=cols < D)
    x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    normed = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)  # cast back before the weight, as the original
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=cols < D)


def _rows(x: Tensor) -> Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def add_rms_norm(x: Tensor, delta: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x + delta, RMSNorm(x + delta)) in one pass per row; x itself and its norm when delta is None."""
    rows = _rows(x)
    deltas = rows if delta is None else _rows(delta)
    total = rows if delta is None else torch.empty_like(rows)
    out = torch.empty_like(rows)
    if rows.shape[0]:
        D = rows.shape[1]
        launch(_add_rms_norm_kernel, (rows.shape[0],), x, rows, deltas, weight, total, out, rows.stride(0),
               deltas.stride(0), total.stride(0), out.stride(0), D, eps, HAS_DELTA=delta is not None,
               BLOCK=triton.next_power_of_2(D), num_warps=8)
    return (x if delta is None else total.view(x.shape)), out.view(x.shape)


# ---- elementwise: one fixed formula per element (no compiler choosing fusions per shape) --------------
@triton.jit
def _rope_qkv_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, scale_ptr, q_out_ptr, k_out_ptr,
                     ck_ptr, cv_ptr, rows_ptr, slots_ptr, H, T, sq_bt, sk_bt, sv_bt, sc_bt,
                     sc_row, sc_h, sc_s, ss_b, ss_t, HAS_SCALE: tl.constexpr, STORE: tl.constexpr, D: tl.constexpr):
    """One (token, head of q or of k): x * cos + rotate_half(x) * sin in fp32, cast back, as the original;
    a query head then times its LogN factor in the model dtype (the original's bf16 product); a key head,
    with STORE, also goes with its value into the token's cache slot."""
    bt, head = tl.program_id(0), tl.program_id(1)
    if head < H:
        x_ptr = q_ptr + bt * sq_bt + head * D
        out_ptr = q_out_ptr + (bt * H + head) * D
    else:
        x_ptr = k_ptr + bt * sk_bt + (head - H) * D
        out_ptr = k_out_ptr + (bt * H + head - H) * D
    d = tl.arange(0, D)
    half: tl.constexpr = D // 2
    x = tl.load(x_ptr + d).to(tl.float32)
    partner = tl.load(x_ptr + (d + half) % D).to(tl.float32)
    rotated = tl.where(d < half, -partner, partner)
    cos = tl.load(cos_ptr + bt * sc_bt + d)
    sin = tl.load(sin_ptr + bt * sc_bt + d)
    y = (x * cos + rotated * sin).to(out_ptr.dtype.element_ty)
    if HAS_SCALE:
        if head < H:
            y = (y.to(tl.float32) * tl.load(scale_ptr + bt).to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + d, y)
    if STORE:
        if head >= H:  # int64 offsets: one layer's cache can pass 2**31 elements
            b, t, h = bt // T, bt % T, head - H
            row = tl.load(rows_ptr + b).to(tl.int64)
            slot = tl.load(slots_ptr + b * ss_b + t * ss_t).to(tl.int64)
            at = row * sc_row + h * sc_h + slot * sc_s + d
            tl.store(ck_ptr + at, y)
            tl.store(cv_ptr + at, tl.load(v_ptr + bt * sv_bt + h * D + d))


def rope_qkv(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, q_scale: Tensor | None,
             store=None) -> tuple[Tensor, Tensor]:
    """q, k, v [B, T, H, D] (heads contiguous; views of the fused projection are fine), cos/sin [B, T, 1, D] fp32,
    q_scale [B, T, 1, 1] in the model dtype or None, store: ops.CacheSlots or None. Returns q and k rotated
    (queries scaled); k and v also go into the cache slots. One launch."""
    B, T, H, D = q.shape
    for x in (q, k, v):
        assert x.stride(3) == 1 and x.stride(2) == D and x.stride(0) == T * x.stride(1)
    cos, sin = cos.contiguous(), sin.contiguous()
    q_out = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device)
    k_out = torch.empty_like(q_out)
    scale = q_scale.contiguous() if q_scale is not None else cos
    if store is not None:
        assert store.k.stride() == store.v.stride() and store.k.stride(-1) == 1
        cache_k, cache_v, rows, slots = store
        cache_strides, slot_strides = store.k.stride()[:3], slots.stride()
    else:
        cache_k, cache_v, rows, slots, cache_strides, slot_strides = k, v, cos, cos, (0, 0, 0), (0, 0)
    if B * T:
        launch(_rope_qkv_kernel, (B * T, 2 * H), q, q, k, v, cos, sin, scale, q_out, k_out, cache_k, cache_v, rows,
               slots, H, T, q.stride(1), k.stride(1), v.stride(1), D, *cache_strides, *slot_strides,
               HAS_SCALE=q_scale is not None, STORE=store is not None, D=D)
    return q_out, k_out


@triton.jit
def _swiglu_kernel(up_ptr, gate_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    gate = tl.load(gate_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offs, mask=offs < n, other=0.0)
    act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)  # SiLU rounded to the model dtype, as eager PyTorch
    tl.store(out_ptr + offs, (up.to(tl.float32) * act.to(tl.float32)).to(up.dtype), mask=offs < n)


def swiglu(up: Tensor, gate: Tensor) -> Tensor:
    up, gate = up.contiguous(), gate.contiguous()
    out = torch.empty_like(up)
    n = up.numel()
    if n:
        launch(_swiglu_kernel, (triton.cdiv(n, 1024),), up, up, gate, out, n, BLOCK=1024)
    return out


# ---- attention ----------------------------------------------------------------------------------------
@triton.jit
def _logical_keys(j, P, S, b, h, k_ptr, pk_ptr, kpos_ptr, sk_b, sk_h, sk_s, skp_b, spk_h, spk_p, offs_d):
    """Keys [D, BLOCK_N] and positions of logical key indices j: the shared prefix [H, P, D] below P, then
    the row's own keys (own key s at logical P + s); keys that are neither load as zeros at position -1."""
    in_prefix = j < P
    own = j - P
    own_ok = (j >= P) & (own < S)
    k_pre = tl.load(pk_ptr + h * spk_h + j[None, :] * spk_p + offs_d[:, None], mask=in_prefix[None, :], other=0.0)
    k_own = tl.load(k_ptr + b * sk_b + h * sk_h + own[None, :] * sk_s + offs_d[:, None], mask=own_ok[None, :],
                    other=0.0)
    own_pos = tl.load(kpos_ptr + b * skp_b + own, mask=own_ok, other=-1)
    return tl.where(in_prefix[None, :], k_pre, k_own), tl.where(in_prefix, j, own_pos)


@triton.jit
def _attend_block(q, k, v, visible, m_i, l_i, acc, scale, IEEE: tl.constexpr):
    """One key block folded into an online softmax: scores q @ k, those not `visible` masked out, then the
    running (max, sum, unnormalised output) updated. A block with nothing visible changes no bit."""
    if IEEE:
        s = tl.dot(q, k, input_precision="ieee") * scale
    else:
        s = tl.dot(q, k) * scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc


@triton.jit
def _logical_values(j, P, S, b, h, v_ptr, pv_ptr, sv_b, sv_h, sv_s, spv_h, spv_p, offs_d):
    """Values [BLOCK_N, D] of logical key indices j, laid out as _logical_keys reads the keys."""
    in_prefix = j < P
    own = j - P
    own_ok = (j >= P) & (own < S)
    v_pre = tl.load(pv_ptr + h * spv_h + j[:, None] * spv_p + offs_d[None, :], mask=in_prefix[:, None], other=0.0)
    v_own = tl.load(v_ptr + b * sv_b + h * sv_h + own[:, None] * sv_s + offs_d[None, :], mask=own_ok[:, None],
                    other=0.0)
    return tl.where(in_prefix[:, None], v_pre, v_own)


@triton.jit(do_not_specialize=["T", "S", "P", "window"])  # one compiled kernel for every length
def _attention_kernel(q_ptr, k_ptr, v_ptr, kpos_ptr, pk_ptr, pv_ptr, qpos_ptr, out_ptr,
                      T, S, P, H, scale, window,
                      sq_b, sq_t, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, skp_b, spk_h, spk_p, spv_h, spv_p,
                      sqp_b, so_b, so_t, so_h,
                      ALIGNED: tl.constexpr, IEEE: tl.constexpr, D: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (row, head, query block): online softmax over logical keys [0, P + S) in aligned blocks."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q_pos = tl.load(qpos_ptr + b * sqp_b + offs_m, mask=offs_m < T, other=-1)
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    n_keys = P + S
    if ALIGNED:  # own key s holds position P + s: nothing past the block's last query can be visible
        n_keys = tl.minimum(n_keys, tl.max(q_pos, axis=0) + 1)
    for start in range(0, n_keys, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)  # logical key indices
        k, k_pos = _logical_keys(j, P, S, b, h, k_ptr, pk_ptr, kpos_ptr, sk_b, sk_h, sk_s, skp_b, spk_h, spk_p, offs_d)
        visible = (k_pos[None, :] >= 0) & (k_pos[None, :] <= q_pos[:, None])
        if window > 0:
            visible = visible & (q_pos[:, None] - k_pos[None, :] < window)
        visible = visible | ((q_pos[:, None] < 0) & (k_pos[None, :] >= 0))  # padding queries stay finite
        v = _logical_values(j, P, S, b, h, v_ptr, pv_ptr, sv_b, sv_h, sv_s, spv_h, spv_p, offs_d)
        m_i, l_i, acc = _attend_block(q, k, v, visible, m_i, l_i, acc, scale, IEEE)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=offs_m[:, None] < T)


def attention(q: Tensor, k: Tensor, v: Tensor, key_pos: Tensor, q_pos: Tensor, prefix_kv=None,
              window: int | None = None, aligned: bool = False, block_m: int = 64) -> Tensor:
    """q [B, T, H, D] (positions q_pos [B, T], -1 = padding) over own keys k, v [B, H, S, D] (positions
    key_pos [B, S], -1 = empty) and an optional shared prefix (k, v) [H, P, D] at positions 0..P-1.

    Returns [B, T, H, D]. aligned: own key s holds position P + s or is empty (the engine's layout),
    which lets a query block stop at its last query's position.
    """
    B, T, H, D = q.shape
    S = k.shape[2]
    if prefix_kv is None:  # P = 0: the prefix pointers are never read, so the own keys stand in
        pk, pv, P = k[0], v[0], 0
    else:
        pk, pv = prefix_kv
        P = pk.shape[1]
    assert k.stride(-1) == v.stride(-1) == pk.stride(-1) == pv.stride(-1) == q.stride(-1) == 1
    out = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device)
    grid = (triton.cdiv(T, block_m), B * H)
    launch(_attention_kernel, grid, q, q, k, v, key_pos, pk, pv, q_pos, out, T, S, P, H, D ** -0.5, window or 0,
           q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
           v.stride(0), v.stride(1), v.stride(2), key_pos.stride(0), pk.stride(0), pk.stride(1),
           pv.stride(0), pv.stride(1), q_pos.stride(0), out.stride(0), out.stride(1), out.stride(2),
           ALIGNED=aligned, IEEE=q.dtype == torch.float32, D=D, BLOCK_M=block_m, BLOCK_N=ATTN_BLOCK_N,
           num_warps=4, num_stages=2)
    return out


# ---- decode attention: one query per row, split-KV with a fixed split size --------------------------
@triton.jit(do_not_specialize=["S", "P", "B", "window", "first_split"])
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, kpos_ptr, pk_ptr, pv_ptr, qpos_ptr, part_ptr,
                         S, P, B, H, scale, window, n_split, first_split,
                         sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, skp_b, spk_h, spk_p, spv_h, spv_p, sqp_b,
                         ROWS: tl.constexpr, IEEE: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                         SPLIT: tl.constexpr):
    """One (ROWS rows, head, split): online softmax over logical keys [split * SPLIT, (split + 1) * SPLIT) in
    BLOCK_N blocks aligned at 0; writes each row's (unnormalised output[D], max, sum) in fp32. The queries are
    rows of a 16-row tile (the least a tensor-core product takes): ROWS = 1 puts one row in it (rows zero
    after it, never stored), ROWS = 16 sixteen rows, for splits inside the shared prefix, whose keys are the
    same for every row: read once for 16 rows. A row's bits are the same either way: each row of a tile
    product depends on its own query alone, and blocks a row cannot see change none of its bits."""
    sp, pid = tl.program_id(0) + first_split, tl.program_id(1)
    h, first_row = pid % H, (pid // H) * ROWS
    offs_d = tl.arange(0, D)
    tile = tl.arange(0, 16)
    rows = first_row + tile
    real = (tile < ROWS) & (rows < B)
    q_pos = tl.load(qpos_ptr + rows * sqp_b, mask=real, other=-1)
    q = tl.load(q_ptr + rows[:, None] * sq_b + h * sq_h + offs_d[None, :], mask=real[:, None], other=0.0)
    m_i = tl.full((16,), float("-inf"), tl.float32)
    l_i = tl.zeros((16,), tl.float32)
    acc = tl.zeros((16, D), tl.float32)
    start = sp * SPLIT
    # own key s holds position P + s, so nothing past a query's position is visible (a padding row,
    # q_pos = -1, sees nothing and gives zeros, as attention() does)
    end = tl.minimum(start + SPLIT, tl.minimum(P + S, tl.max(q_pos, axis=0) + 1))
    for block in range(start, end, BLOCK_N):
        j = block + tl.arange(0, BLOCK_N)
        # the first row's keys: with ROWS = 16 the split lies inside the prefix, the same for every row
        k, k_pos = _logical_keys(j, P, S, first_row, h, k_ptr, pk_ptr, kpos_ptr, sk_b, sk_h, sk_s, skp_b, spk_h,
                                 spk_p, offs_d)
        visible = (k_pos[None, :] >= 0) & (k_pos[None, :] <= q_pos[:, None])
        if window > 0:
            visible = visible & (q_pos[:, None] - k_pos[None, :] < window)
        v = _logical_values(j, P, S, first_row, h, v_ptr, pv_ptr, sv_b, sv_h, sv_s, spv_h, spv_p, offs_d)
        m_i, l_i, acc = _attend_block(q, k, v, visible, m_i, l_i, acc, scale, IEEE)
    part = part_ptr + ((rows * H + h) * n_split + sp) * (D + 2)
    tl.store(part[:, None] + offs_d[None, :], acc, mask=real[:, None])
    tl.store(part + D, m_i, mask=real)
    tl.store(part + D + 1, l_i, mask=real)


@triton.jit
def _decode_combine_kernel(part_ptr, out_ptr, H, n_split, so_b, so_h, D: tl.constexpr):
    """One (row, head): the splits' partial softmaxes merged in split order (one order for any batch)."""
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    offs_d = tl.arange(0, D)
    part = part_ptr + bh * n_split * (D + 2)
    m = tl.load(part + D)
    for sp in range(1, n_split):
        m = tl.maximum(m, tl.load(part + sp * (D + 2) + D))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l_sum = tl.full([], 0.0, tl.float32)
    acc = tl.zeros((D,), tl.float32)
    for sp in range(0, n_split):
        scale = tl.exp(tl.load(part + sp * (D + 2) + D) - m_safe)
        l_sum += tl.load(part + sp * (D + 2) + D + 1) * scale
        acc += tl.load(part + sp * (D + 2) + offs_d) * scale
    out = acc / tl.where(l_sum == 0.0, 1.0, l_sum)
    tl.store(out_ptr + b * so_b + h * so_h + offs_d, out.to(out_ptr.dtype.element_ty))


def decode_attention(q: Tensor, k: Tensor, v: Tensor, key_pos: Tensor, q_pos: Tensor, prefix_kv=None,
                     window: int | None = None, aligned: bool = True) -> Tensor:
    """attention() for one query per row (a decode step) in the engine's aligned layout (own key s at
    position P + s). Shapes as attention(), T = 1. Static grid: capturable in a CUDA graph."""
    B, T, H, D = q.shape
    assert T == 1 and aligned, "decode_attention serves the engine's decode step only"
    S = k.shape[2]
    if prefix_kv is None:
        pk, pv, P = k[0], v[0], 0
    else:
        pk, pv = prefix_kv
        P = pk.shape[1]
    assert k.stride(-1) == v.stride(-1) == pk.stride(-1) == pv.stride(-1) == q.stride(-1) == 1
    n_split = triton.cdiv(P + S, DECODE_SPLIT)
    n_shared = P // DECODE_SPLIT  # splits inside the shared prefix: their keys serve 16 rows per program
    parts = torch.empty(B * H, n_split, D + 2, dtype=torch.float32, device=q.device)
    out = torch.empty(B, 1, H, D, dtype=q.dtype, device=q.device)
    strides = (q.stride(0), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
               key_pos.stride(0), pk.stride(0), pk.stride(1), pv.stride(0), pv.stride(1), q_pos.stride(0))
    for rows, first, count in ((16, 0, n_shared), (1, n_shared, n_split - n_shared)):
        if count:
            launch(_decode_split_kernel, (count, triton.cdiv(B, rows) * H), q, q, k, v, key_pos, pk, pv, q_pos, parts,
                   S, P, B, H, D ** -0.5, window or 0, n_split, first, *strides, ROWS=rows,
                   IEEE=q.dtype == torch.float32, D=D, BLOCK_N=DECODE_BLOCK_N, SPLIT=DECODE_SPLIT, num_warps=4,
                   num_stages=2)
    launch(_decode_combine_kernel, (B * H,), q, parts, out, H, n_split, out.stride(0), out.stride(2), D=D, num_warps=1)
    return out
