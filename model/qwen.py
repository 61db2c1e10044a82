"""Qwen (v1) in plain PyTorch: RMSNorm, RoPE with dynamic NTK, LogN, layer-wise windows, SwiGLU.

Parameter names equal the checkpoint keys of both published layouts, so loading needs no mapping.
Positions are an explicit [B, T] input counted from each row's first real token (-1 marks padding):
a left-padded row then computes exactly what it computes alone, and LogN / NTK see true lengths.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import ModelArgs
from .ops import FAST, CacheSlots, Ops


def ntk_alpha(length: Tensor, seq_length: int) -> Tensor:
    """Dynamic-NTK alpha per row (spec 6.4): 2**ceil(log2(L / seq_length) + 1) - 1, at least 1."""
    context_value = torch.log2(length.double() / seq_length) + 1
    return torch.clamp(2 ** torch.ceil(context_value) - 1, min=1)


def rope_inv_freq(alpha: Tensor, base: float, head_dim: int) -> Tensor:
    """Inverse frequencies [B, head_dim/2] for per-row alphas: base' = base * alpha^(d/(d-2)), in fp32."""
    scaled_base = (base * alpha.double() ** (head_dim / (head_dim - 2))).float()
    exponents = torch.arange(0, head_dim, 2, device=alpha.device).float() / head_dim
    return 1.0 / scaled_base[:, None] ** exponents[None, :]


def logn_scale(positions: Tensor, seq_length: int) -> Tensor:
    """LogN query factor (spec 6.5): log(p+1) / log(seq_length) once p+1 > seq_length, else 1."""
    count = (positions + 1).double()
    return torch.where(count > seq_length, torch.log(count) / math.log(seq_length), torch.ones_like(count))


@dataclass
class KVCache:
    """Static cache for decoding: every row owns its slots; `pos` says which position each slot holds."""

    k: Tensor  # [n_layer, batch, n_head, max_len, head_dim]
    v: Tensor
    pos: Tensor  # [batch, max_len], -1 = empty
    ntk_len: Tensor  # [batch]: the prefill length that chose each row's NTK alpha (kept while decoding)

    @classmethod
    def empty(cls, args: ModelArgs, batch: int, max_len: int, dtype, device) -> "KVCache":
        shape = (args.n_layer, batch, args.n_head, max_len, args.head_dim)
        return cls(
            k=torch.zeros(shape, dtype=dtype, device=device),
            v=torch.zeros(shape, dtype=dtype, device=device),
            pos=torch.full((batch, max_len), -1, dtype=torch.long, device=device),
            ntk_len=torch.ones(batch, dtype=torch.long, device=device),
        )

    def prefill(self, rows: Tensor, positions: Tensor, ntk_len: Tensor | None = None) -> "CacheView":
        """Write rows' tokens into slots 0..T-1; attention runs over the new tokens (and a prefix) only."""
        slots = torch.arange(positions.shape[1], device=positions.device).expand_as(positions)
        self.pos[rows] = -1
        self.pos[rows[:, None], slots] = positions
        self.ntk_len[rows] = positions.max(dim=1).values + 1 if ntk_len is None else ntk_len
        return CacheView(self, rows, slots, read=False, read_len=0, aligned=False)

    def decode(self, slots: Tensor, positions: Tensor, read_len: int | None = None, aligned: bool = False) -> "CacheView":
        """Write one step for every row at `slots` [B, T]; attention reads slots [0, read_len).

        aligned: the caller promises that slot s holds position P + s (P: the prefix length), see
        model/kernels.py."""
        rows = torch.arange(positions.shape[0], device=positions.device)
        self.pos[rows[:, None], slots] = positions
        return CacheView(self, rows, slots, read=True, read_len=read_len or self.pos.shape[1], aligned=aligned)


@dataclass
class CacheView:
    cache: KVCache
    rows: Tensor
    slots: Tensor
    read: bool
    read_len: int  # decoding reads only the slots that can hold tokens yet (static per captured graph)
    aligned: bool  # slot s holds position P + s: attention may stop at the query's position

    def slots_of(self, layer: int) -> CacheSlots:
        """Where this forward's keys and values of `layer` go (the op set's rope_qkv stores them)."""
        return CacheSlots(self.cache.k[layer], self.cache.v[layer], self.rows, self.slots)

    def attended(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """What attention reads, [b, H, S, D]: the cache's first read_len slots when decoding, else the new
        (already stored) k, v [b, T, H, D]."""
        if self.read:
            return self.cache.k[layer][:, :, : self.read_len], self.cache.v[layer][:, :, : self.read_len]
        return k.transpose(1, 2), v.transpose(1, 2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, delta: Tensor | None, ops: Ops) -> tuple[Tensor, Tensor]:
        """The residual stream x + delta (x when delta is None) and its norm: the add and the norm in one pass."""
        return ops.add_rms_norm(x, delta, self.weight, self.eps)


class Linear(nn.Linear):
    """nn.Linear whose product is the op set's (an Int4 layer takes the same two arguments)."""

    def forward(self, x: Tensor, ops: Ops) -> Tensor:
        return ops.linear(x, self.weight, self.bias)

    def rows(self, ids: Tensor) -> Tensor:
        """Weight rows of the given output ids (LM-head rows of token ids; tensor_parallel gathers them)."""
        return self.weight[ids]


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = Linear(args.dim, args.intermediate_size, bias=False)  # up
        self.w2 = Linear(args.dim, args.intermediate_size, bias=False)  # gate: SiLU goes on w2
        self.c_proj = Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor, ops: Ops) -> Tensor:
        return self.c_proj(ops.swiglu(self.w1(x, ops), self.w2(x, ops)), ops)


@dataclass
class LayerInputs:
    """Everything attention needs that depends on positions, not on weights (built once per window size)."""

    cos: Tensor  # [B, T, 1, D]
    sin: Tensor
    q_scale: Tensor | None  # LogN factor [B, T, 1, 1] in the model dtype, or None
    mask: Tensor | None  # [B, 1, T, S] True = attend; None = plain causal
    prefix_mask: Tensor | None  # [B, 1, T, P] or None = every prefix token visible
    q_pos: Tensor  # [B, T], -1 = padding (the batch-invariant kernels build their masks from positions)
    key_pos: Tensor  # [B, S] positions of the own keys, -1 = empty
    window: int | None
    aligned: bool  # own key s holds position P + s (the engine's layout): see model/kernels.py
    decoding: bool  # one token per row over a cache being read: the op set's decode_attention


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_head, self.head_dim = args.n_head, args.head_dim
        self.c_attn = Linear(args.dim, 3 * args.dim, bias=True)  # fused q, k, v
        self.c_proj = Linear(args.dim, args.dim, bias=False)

    def forward(self, x: Tensor, inp: LayerInputs, layer: int, kv: CacheView | None, prefix, ops: Ops) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.c_attn(x, ops).view(B, T, 3, self.n_head, self.head_dim).unbind(2)  # each [B, T, H, D]
        q, k = ops.rope_qkv(q, k, v, inp.cos, inp.sin, inp.q_scale, None if kv is None else kv.slots_of(layer))
        if kv is not None:
            k, v = kv.attended(layer, k, v)
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        pkv = None if prefix is None else (prefix.k[layer][0], prefix.v[layer][0])
        attend = ops.decode_attention if inp.decoding else ops.attention
        y = attend(q, k, v, inp, pkv)  # [B, T, H, D]
        return self.c_proj(y.reshape(B, T, -1), ops)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.ln_1 = RMSNorm(args.dim, args.norm_eps)
        self.attn = Attention(args)
        self.ln_2 = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, delta, inp, layer, kv, prefix, ops: Ops):
        """x + delta is the residual stream entering the block (delta None in the first); returns the stream
        after attention and the MLP's output, which the next norm adds (each add shares its norm's pass)."""
        x, normed = self.ln_1(x, delta, ops)
        x, normed = self.ln_2(x, self.attn(normed, inp, layer, kv, prefix, ops), ops)
        return x, self.mlp(normed, ops)


class Qwen(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # the kernels every layer computes with (model/ops.py): chosen once by whoever builds the model
        self.ops: Ops = FAST
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(args.vocab_size, args.dim),
                h=nn.ModuleList(Block(args) for _ in range(args.n_layer)),
                ln_f=RMSNorm(args.dim, args.norm_eps),
            )
        )
        self.lm_head = Linear(args.dim, args.vocab_size, bias=False)

    def forward(self, tokens: Tensor, attention_mask: Tensor | None = None, **kw) -> Tensor:
        """Logits [B, T, vocab] for token ids [B, T]; see `hidden` for the keyword arguments."""
        return self.logits(self.hidden(tokens, attention_mask, **kw))

    def logits(self, hidden: Tensor) -> Tensor:
        """The LM head over hidden states [..., dim]."""
        return self.lm_head(hidden, self.ops)

    def hidden(
        self,
        tokens: Tensor,
        attention_mask: Tensor | None = None,
        *,
        positions: Tensor | None = None,
        kv: CacheView | None = None,
        prefix: KVCache | None = None,
        switches: ModelArgs | None = None,
    ) -> Tensor:
        """Final-norm hidden states [B, T, dim].

        attention_mask [B, T] (1 = token, 0 = padding) or explicit positions [B, T] (-1 = padding);
        kv: a view of a KVCache to write (and, when decoding, read); prefix: a batch-1 KVCache holding
        positions 0..P-1 that every row attends to (its rows' positions then start at P); switches: the
        model's args with other NTK / LogN / window settings (config.with_switches) for this call only.
        """
        args = switches or self.args
        positions = self._positions(tokens, attention_mask, positions, prefix)
        if kv is not None:
            ntk_len = kv.cache.ntk_len[kv.rows]
        else:
            ntk_len = positions.max(dim=1).values + 1
        n_prefix = 0 if prefix is None else prefix.pos.shape[1]
        decoding = kv is not None and kv.read and tokens.shape[1] == 1
        if kv is not None and kv.read:  # keys are cache slots, visibility comes from their positions
            key_pos, plain_causal, aligned = kv.cache.pos[:, : kv.read_len], False, kv.aligned
        else:
            key_pos = positions
            plain_causal = aligned = _right_padded(positions, n_prefix)
        inputs = {}
        x, delta = self.transformer.wte(tokens), None
        for i, block in enumerate(self.transformer.h):
            window = args.windows[i] if args.windows else None
            if window not in inputs:
                inputs[window] = self._layer_inputs(args, positions, key_pos, ntk_len, window, prefix, plain_causal,
                                                    aligned, decoding, x.dtype)
            x, delta = block(x, delta, inputs[window], i, kv, prefix, self.ops)
        return self.transformer.ln_f(x, delta, self.ops)[1]

    def _positions(self, tokens, attention_mask, positions, prefix) -> Tensor:
        if positions is not None:
            return positions
        start = 0 if prefix is None else prefix.pos.shape[1]
        if attention_mask is None:
            return start + torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        mask = attention_mask.bool()
        return torch.where(mask, start + mask.long().cumsum(1) - 1, -1)

    def _layer_inputs(self, args, positions, key_pos, ntk_len, window, prefix, plain_causal, aligned,
                      decoding, dtype) -> LayerInputs:
        span = ntk_len if window is None else ntk_len.clamp(max=window)  # a layer never sees more than its window
        alpha = ntk_alpha(span, args.seq_length) if args.use_dynamic_ntk else torch.ones_like(span, dtype=torch.double)
        angles = positions.clamp(min=0)[..., None].float() * rope_inv_freq(alpha, args.rope_base, args.head_dim)[:, None, :]
        emb = torch.cat((angles, angles), dim=-1)[:, :, None, :]  # [B, T, 1, D]
        q_scale = None
        if args.use_logn_attn:
            counted = positions if window is None else positions.clamp(max=window - 1)
            q_scale = logn_scale(counted, args.seq_length)[:, :, None, None].to(dtype)  # once, not per layer
        mask = prefix_mask = None
        if self.ops.masks:  # the batch-invariant kernels mask from positions
            mask = None if plain_causal and window is None else _visible(positions, key_pos, window)
            if prefix is not None and window is not None:
                prefix_mask = _visible(positions, prefix.pos.expand(positions.shape[0], -1), window)
        return LayerInputs(emb.cos(), emb.sin(), q_scale, mask, prefix_mask, positions, key_pos, window, aligned,
                           decoding)


def _right_padded(positions: Tensor, start: int = 0) -> bool:
    """True when each row counts up by one from position `start` (a prefix's length) and padding (-1)
    only follows: plain causal attention is then exact, and own key s holds position start + s
    (one host sync; never called while decoding)."""
    steps = positions[:, 1:] - positions[:, :-1]
    real = positions[:, 1:] >= 0
    first = positions[:, 0]
    return bool(((steps == 1) | ~real).all() and (real <= (positions[:, :-1] >= 0)).all()
                and ((first == start) | (first < 0)).all())


def _visible(q_pos: Tensor, key_pos: Tensor, window: int | None) -> Tensor:
    """[B, 1, T, S]: key visible iff it holds a token at or before the query and within the window.

    Padding queries (position -1) see every key so that their (unused) outputs stay finite.
    """
    q = q_pos[:, None, :, None]
    k = key_pos[:, None, None, :]
    visible = (k >= 0) & (k <= q)
    if window is not None:
        visible &= q - k < window
    return visible | (q < 0)


def init_weights(model: Qwen, std: float = 0.02, seed: int = 0) -> Qwen:
    """Random weights (tests and speed benchmarks); norms stay at 1."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)
    return model
