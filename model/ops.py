"""The op sets: the one place that decides which kernels compute every layer.

An op set names the functions behind each layer: linear, add_rms_norm (the residual add and the next norm in
one pass), rope_qkv (queries and keys rotated, queries scaled by LogN, keys and values stored in their cache
slots), swiglu, attention (prefill and scoring) and decode_attention (the engine's one-token decode step
only). The model holds one op set and hands it to every layer, Int4 layers included; whoever builds the model
chooses it once (the native backend, from a run's `--kernels`, through `select`), and its name goes into
run.json.

- FAST: PyTorch's and cuBLAS's kernels (flash attention when installed): fastest; on a GPU a row's
  numbers move with the batch shape.
- INVARIANT: model/kernels.py's batch-invariant kernels: one reduction order per row, whatever the batch
  (cuBLASLt with split-K made impossible for products, Triton for the rest; GPU; Triton's interpreter runs
  the Triton ones on a CPU for tests).
- CPU: FAST's functions, named for what a CPU run is: batch-invariant by the engine's batching (a batch
  only mixes rows of one padded width, see planner.py).
- REFERENCE: FAST with the plain attention formula, for tests.

Attention takes q [B, T, H, D], own keys k, v [B, H, S, D], the layer inputs (positions, masks, window:
qwen.LayerInputs) and an optional shared prefix (k, v) [H, P, D]; it returns [B, T, H, D].
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # optional: the flash-attn package, used for plain causal attention when present
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


@dataclass(frozen=True)
class Ops:
    name: str  # recorded in run.json ("engine")
    linear: Callable  # (x [..., K], weight [N, K], bias [N] | None) -> [..., N]
    add_rms_norm: Callable  # (x, delta | None, weight, eps) -> (x + delta, its RMSNorm)
    # (q, k, v [B, T, H, D], cos, sin [B, T, 1, D] fp32, q_scale [B, T, 1, 1] | None, CacheSlots | None) -> (q, k)
    rope_qkv: Callable
    swiglu: Callable  # (up, gate) -> up * silu(gate)
    attention: Callable  # (q, k, v, inputs, prefix_kv) -> [B, T, H, D]
    decode_attention: Callable  # the same, for the engine's decode step (T == 1, static shapes) only
    masks: bool  # attention reads the boolean masks of the layer inputs (the Triton kernels mask from positions)
    prefix_exact: bool  # a row computes the same bits with its prefix shared or in its own prompt


# ---- PyTorch's kernels ----------------------------------------------------------------------------------
def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def fused_on_gpu(fn):
    """Run an elementwise chain as one generated kernel on a GPU (torch.compile), eagerly elsewhere.

    The fp32 norms and rotations otherwise make several full passes over each activation.
    """
    compiled = None

    def run(*args):
        nonlocal compiled
        if not args[0].is_cuda:
            return fn(*args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        return compiled(*args)

    run.__doc__ = fn.__doc__
    return run


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """fp32 statistics, cast back before the weight, as the original."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE in fp32, cast back, as the original."""
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).type_as(x)


@fused_on_gpu
def add_rms_norm(x: Tensor, delta: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The residual stream x + delta (x when delta is None) and its RMSNorm."""
    if delta is not None:
        x = x + delta
    return x, rms_norm(x, weight, eps)


class CacheSlots(NamedTuple):
    """Where a forward's keys and values go: one layer's cache k, v [rows, H, S, D], and for each token of the
    batch its cache row (rows [b]) and slot (slots [b, T])."""

    k: Tensor
    v: Tensor
    rows: Tensor
    slots: Tensor

    def write(self, k: Tensor, v: Tensor) -> None:
        """Store k, v [b, T, H, D] in their slots."""
        self.k[self.rows[:, None], :, self.slots] = k
        self.v[self.rows[:, None], :, self.slots] = v


@fused_on_gpu
def _rotate_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, q_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    return (q if q_scale is None else q * q_scale), k


def rope_qkv(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, q_scale: Tensor | None,
             store: CacheSlots | None) -> tuple[Tensor, Tensor]:
    """Queries and keys rotated, queries then times their LogN factor (model dtype), as the original; the
    rotated keys and the values stored in the cache slots when given."""
    q, k = _rotate_qk(q, k, cos, sin, q_scale)
    if store is not None:
        store.write(k, v)
    return q, k


@fused_on_gpu
def swiglu(up: Tensor, gate: Tensor) -> Tensor:
    return up * F.silu(gate)


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """The plain formula: fp32 scores, masked (True = attend), softmax; output and log-sum-exp [B, H, T].

    Also the decode path (one query per row over its cache slots): measured on an H100, plain batched
    products beat a generated multiply-and-reduce kernel twofold (bench/RESULTS.md, issue 4's notes).
    """
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = scores.logsumexp(-1)
    return (scores - lse[..., None]).exp().to(v.dtype) @ v, lse


@fused_on_gpu
def merge_attention(own: Tensor, own_lse: Tensor, pre: Tensor, pre_lse: Tensor) -> Tensor:
    """Softmax over two key sets from their separate results and log-sum-exps."""
    lse = torch.logaddexp(own_lse, pre_lse)
    out = own.float() * (own_lse - lse).exp()[..., None] + pre.float() * (pre_lse - lse).exp()[..., None]
    return out.to(own.dtype)


def library_attention(q, k, v, mask, prefix_kv=None, prefix_mask=None) -> Tensor:
    """q [B, H, T, D] against own keys k, v [B, H, S, D] and optionally a shared prefix [H, P, D].

    mask [B, 1, T, S] (True = attend), or None for plain causal attention (right padding included:
    a padding key sits after every real query). The prefix is one tensor for the whole batch: all rows'
    queries meet it in one fused attention call, merged with the own part through the log-sum-exps;
    its K/V are never copied per row.
    """
    if prefix_kv is not None and prefix_mask is not None:
        return reference_attention(q, k, v, mask, prefix_kv, prefix_mask)
    if prefix_kv is None and q.shape[-2] == 1 and mask is not None:  # decoding
        return explicit_attention(q, k, v, mask)[0]
    if prefix_kv is None:
        if mask is None and flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    B, H, T, D = q.shape
    own, own_lse = explicit_attention(q, k, v, mask) if mask is not None else _fused_attention_lse(q, k, v, True)
    pk, pv = prefix_kv
    rows_as_one = q.transpose(0, 1).reshape(1, H, B * T, D)  # every row's queries against the one prefix
    pre, pre_lse = _fused_attention_lse(rows_as_one, pk[None], pv[None], False)
    pre = pre.view(H, B, T, D).transpose(0, 1)
    pre_lse = pre_lse.view(H, B, T).transpose(0, 1)
    return merge_attention(own, own_lse, pre, pre_lse)


def _fused_attention_lse(q, k, v, causal: bool) -> tuple[Tensor, Tensor]:
    """Attention output and its log-sum-exp [B, H, T] (fp32) from PyTorch's fused kernels."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)[:2]
    elif q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
    return out, lse[..., : q.shape[-2]].float()


def _causal(q: Tensor, k: Tensor) -> Tensor:
    return torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril(k.shape[-2] - q.shape[-2])


def reference_attention(q, k, v, mask, prefix_kv=None, prefix_mask=None) -> Tensor:
    """The plain reference: one softmax over prefix and own keys together (the prefix copied per row)."""
    mask = _causal(q, k).expand(q.shape[0], 1, -1, -1) if mask is None else mask
    if prefix_kv is not None:
        B = q.shape[0]
        pk, pv = (t[None].expand(B, -1, -1, -1) for t in prefix_kv)
        if prefix_mask is None:
            prefix_mask = torch.ones(B, 1, q.shape[-2], pk.shape[-2], dtype=torch.bool, device=q.device)
        k, v = torch.cat([pk, k], dim=-2), torch.cat([pv, v], dim=-2)
        mask = torch.cat([prefix_mask.expand(B, -1, q.shape[-2], -1), mask.expand(B, -1, q.shape[-2], -1)], dim=-1)
    return explicit_attention(q, k, v, mask)[0]


def _heads_first(attend: Callable) -> Callable:
    """An attention over [B, H, T, D] queries and boolean masks, in the op sets' layout and signature."""
    def run(q, k, v, inputs, prefix_kv=None):
        return attend(q.transpose(1, 2), k, v, inputs.mask, prefix_kv, inputs.prefix_mask).transpose(1, 2)

    return run


# ---- the batch-invariant kernels (model/kernels.py) ---------------------------------------------------
def _kernels():
    """model/kernels.py, imported on first use (Triton is absent from CPU-only installs, and importing it
    early would fix Triton's mode before a test can choose its interpreter)."""
    from . import kernels

    return kernels


def _invariant_attention(q, k, v, inputs, prefix_kv=None):
    return _kernels().attention(q.contiguous(), k, v, inputs.key_pos, inputs.q_pos, prefix_kv, inputs.window,
                                inputs.aligned)


def _invariant_decode_attention(q, k, v, inputs, prefix_kv=None):
    return _kernels().decode_attention(q.contiguous(), k, v, inputs.key_pos, inputs.q_pos, prefix_kv, inputs.window,
                                       inputs.aligned)


FAST = Ops("fast", F.linear, add_rms_norm, rope_qkv, swiglu, _heads_first(library_attention),
           _heads_first(library_attention), masks=True, prefix_exact=False)
CPU = replace(FAST, name="cpu")
REFERENCE = replace(FAST, name="reference", attention=_heads_first(reference_attention),
                    decode_attention=_heads_first(reference_attention))
INVARIANT = Ops(
    "invariant",
    linear=lambda x, weight, bias=None: _kernels().linear(x, weight, bias),
    add_rms_norm=lambda x, delta, weight, eps: _kernels().add_rms_norm(x, delta, weight, eps),
    rope_qkv=lambda q, k, v, cos, sin, q_scale, store: _kernels().rope_qkv(q, k, v, cos, sin, q_scale, store),
    swiglu=lambda up, gate: _kernels().swiglu(up, gate),
    attention=_invariant_attention,
    decode_attention=_invariant_decode_attention,
    masks=False,
    prefix_exact=True,  # attention's key blocks are aligned at logical key 0 (kernels.py)
)
KERNELS = {"invariant": INVARIANT, "fast": FAST}  # the choices of --kernels


def select(kernels: str, device) -> Ops:
    """The op set a run's `--kernels` names, for a model on `device`. A CPU runs the library kernels
    whatever the choice: they are batch-invariant there (see CPU above)."""
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernel set {kernels!r} (one of {', '.join(KERNELS)})")
    if torch.device(device).type != "cuda":
        return CPU
    if kernels == "invariant" and torch.cuda.is_available():
        _kernels().pin_library_matmuls()  # before the process's first product: see kernels.linear
    return KERNELS[kernels]
