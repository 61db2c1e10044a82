"""The batch-invariant kernels' semantics, checked on the CPU through Triton's interpreter.

Bits are a property of the GPU's instructions, so bench/determinism.py checks them there (the
interpreter's numpy products promise no summation order). Here: each kernel computes its reference
function at every tile size, and attention's masks follow positions (right padding, empty cache
slots, windows, a shared prefix whose key blocks straddle the row's own keys).
"""
import os

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined
pytest.importorskip("triton", minversion="3.7")  # older interpreters break on numpy 2.4
from model import kernels  # noqa: E402
from model.ops import explicit_attention  # noqa: E402
from model.qwen import _visible  # noqa: E402

pytestmark = pytest.mark.usefixtures("launches_pin_fp_fusion")
D, H = 16, 2


def _ref_attention(q, k, v, key_pos, q_pos, window=None):
    """Reference over own keys only: q [B, T, H, D], k/v [B, H, S, D] -> [B, T, H, D]."""
    mask = _visible(q_pos, key_pos, window) & (key_pos[:, None, None, :] >= 0)
    out, _ = explicit_attention(q.transpose(1, 2).double(), k.double(), v.double(), mask)
    return out.transpose(1, 2).float()


@pytest.mark.parametrize("m", [1, 5, 70, 300])  # every tile size of matmul_tile
def test_matmul_equals_reference(m):
    gen = torch.Generator().manual_seed(m)
    x, w, bias = torch.randn(m, 100, generator=gen), torch.randn(50, 100, generator=gen), torch.randn(50, generator=gen)
    torch.testing.assert_close(kernels.matmul(x, w, bias), x.double().matmul(w.double().T).add(bias).float(),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernels.matmul(x[None], w), (x @ w.T)[None], rtol=1e-5, atol=1e-5)


def test_add_rms_norm_equals_the_add_then_the_norm():
    """(fp32: the interpreter rounds to bf16 by truncation, so bf16 bits are checked on the GPU, bench/gpu_check.py)"""
    from model.ops import rms_norm

    x, delta, w = torch.randn(3, 5, 96), torch.randn(3, 5, 96), torch.rand(96) + 0.5
    total, normed = kernels.add_rms_norm(x, delta, w, 1e-6)
    assert torch.equal(total, x + delta)
    torch.testing.assert_close(normed, rms_norm(x + delta, w, 1e-6), rtol=1e-6, atol=1e-6)
    alone, normed = kernels.add_rms_norm(x, None, w, 1e-6)  # the first layer: nothing to add
    assert alone is x
    torch.testing.assert_close(normed, rms_norm(x, w, 1e-6), rtol=1e-6, atol=1e-6)


def _prompt_batch(lengths, start=0, seed=0):
    """Right-padded fresh keys laid out as the model's: q [B, T, H, D]; k [B, H, T, D] (a rotated copy)
    and v (a view into the fused projection, other strides than k); positions [B, T] from `start`."""
    gen = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths)
    q, k, v = torch.randn(B, T, 3, H, D, generator=gen).unbind(2)
    q, k = q.contiguous(), k.contiguous()
    pos = torch.full((B, T), -1)
    for row, n in enumerate(lengths):
        pos[row, :n] = torch.arange(start, start + n)
    return q, k.transpose(1, 2), v.transpose(1, 2), pos


@pytest.mark.parametrize("window", [None, 37])
@pytest.mark.parametrize("aligned", [False, True])
def test_prefill_attention_equals_reference(window, aligned):
    q, k, v, pos = _prompt_batch([150, 9, 70])
    out = kernels.attention(q, k, v, pos, pos, window=window, aligned=aligned)
    real = pos >= 0
    torch.testing.assert_close(out[real], _ref_attention(q, k, v, pos, pos, window)[real], rtol=1e-5, atol=1e-5)


def test_decode_attention_reads_only_filled_slots():
    gen = torch.Generator().manual_seed(3)
    B, S = 3, 90
    q = torch.randn(B, 1, H, D, generator=gen)
    k, v = torch.randn(B, H, S, D, generator=gen), torch.randn(B, H, S, D, generator=gen)
    key_pos = torch.full((B, S), -1)
    for row, n in enumerate((90, 12, 65)):
        key_pos[row, :n] = torch.arange(n)
    q_pos = (key_pos.max(1).values - 1)[:, None]  # a query sees all but the last filled slot
    out = kernels.attention(q, k, v, key_pos, q_pos, aligned=True, block_m=16)
    torch.testing.assert_close(out, _ref_attention(q, k, v, key_pos, q_pos), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 50])
def test_shared_prefix_equals_the_full_prompt(window):
    """Keys 0..P-1 held once as a prefix [H, P, D] give what the same keys in each row's own prompt give."""
    P = 100  # not a multiple of the key block: blocks straddle prefix and own keys
    q, k, v, pos = _prompt_batch([P + 40, P + 7], seed=1)
    k[1, :, :P], v[1, :, :P] = k[0, :, :P], v[0, :, :P]  # both rows share row 0's prefix
    prefix = (k[0, :, :P].contiguous(), v[0, :, :P].contiguous())
    shared = kernels.attention(q[:, P:].contiguous(), k[:, :, P:], v[:, :, P:], pos[:, P:], pos[:, P:], prefix,
                               window, aligned=True)
    real = pos[:, P:] >= 0
    reference = _ref_attention(q, k, v, pos, pos, window)[:, P:]
    torch.testing.assert_close(shared[real], reference[real], rtol=1e-5, atol=1e-5)


def test_rope_qkv_and_swiglu_equal_reference():
    from model.ops import CacheSlots, rope, rope_qkv, swiglu

    q, k, v = torch.randn(2, 5, 3, H, D).unbind(2)  # a fused projection's q, k, v: strided like the model's
    angles = torch.rand(2, 5, 1, D)
    cos, sin = angles.cos(), angles.sin()
    q_scale = torch.rand(2, 5, 1, 1) + 1.0  # LogN factors
    for scale in (None, q_scale):
        rotated_q, rotated_k = kernels.rope_qkv(q, k, v, cos, sin, scale)
        expected_q = rope(q, cos, sin) * (1.0 if scale is None else scale)
        torch.testing.assert_close(rotated_q, expected_q, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rotated_k, rope(k, cos, sin), rtol=1e-6, atol=1e-6)
    # into cache rows 3 and 1 of 4, at each row's own slots (a prefill's expanded arange, a decode step's column)
    for slots in (torch.arange(5).expand(2, -1), torch.tensor([[7], [2]]).expand(2, 5)[:, :5] + torch.arange(5)):
        caches = [(torch.zeros(4, H, 16, D), torch.zeros(4, H, 16, D)) for _ in range(2)]
        rows = torch.tensor([3, 1])
        got = kernels.rope_qkv(q, k, v, cos, sin, q_scale, CacheSlots(*caches[0], rows, slots))
        expected = rope_qkv(q, k, v, cos, sin, q_scale, CacheSlots(*caches[1], rows, slots))
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(caches[0], caches[1], rtol=1e-6, atol=1e-6)
        assert caches[0][1][rows[:, None], :, slots].equal(v)  # values are copied, not rotated
        assert caches[0][0][0].abs().sum() == 0 and caches[0][0][2].abs().sum() == 0  # other rows untouched
    up, gate = torch.randn(3, 7, 40), torch.randn(3, 7, 40)
    torch.testing.assert_close(kernels.swiglu(up, gate), swiglu(up, gate), rtol=1e-6, atol=1e-6)


def _decode_batch(lengths, capacity, prefix=0, seed=4):
    """One query per row after `lengths` own keys laid out as the engine lays them (own slot s holds
    position prefix + s), in a cache of `capacity` slots; a row of length 0 is padding (q_pos -1)."""
    gen = torch.Generator().manual_seed(seed)
    B = len(lengths)
    q = torch.randn(B, 1, H, D, generator=gen)
    k, v = torch.randn(B, H, capacity, D, generator=gen), torch.randn(B, H, capacity, D, generator=gen)
    key_pos = torch.full((B, capacity), -1)
    for row, n in enumerate(lengths):
        key_pos[row, :n] = torch.arange(prefix, prefix + n)
    q_pos = torch.tensor([[prefix + n - 1 if n else -1] for n in lengths])
    return q, k, v, key_pos, q_pos


@pytest.mark.parametrize("window", [None, 300])
def test_decode_attention_equals_reference_across_splits(window):
    lengths = [1, kernels.DECODE_SPLIT - 1, kernels.DECODE_SPLIT + 70, 2 * kernels.DECODE_SPLIT + 3]
    q, k, v, key_pos, q_pos = _decode_batch(lengths, capacity=max(lengths))
    out = kernels.decode_attention(q, k, v, key_pos, q_pos, window=window)
    torch.testing.assert_close(out, _ref_attention(q, k, v, key_pos, q_pos, window), rtol=1e-5, atol=1e-5)


def test_decode_attention_bits_do_not_depend_on_capacity_or_neighbours():
    """More cache slots (more, empty splits) and other rows change no bit of a row; padding rows give 0."""
    q, k, v, key_pos, q_pos = _decode_batch([600, 0, 45], capacity=3 * kernels.DECODE_SPLIT)
    wide = kernels.decode_attention(q, k, v, key_pos, q_pos)
    narrow = kernels.decode_attention(q[2:], k[2:, :, :600], v[2:, :, :600], key_pos[2:, :600], q_pos[2:])
    alone = kernels.decode_attention(q[:1], k[:1, :, :600], v[:1, :, :600], key_pos[:1, :600], q_pos[:1])
    assert torch.equal(wide[2:], narrow) and torch.equal(wide[:1], alone)
    assert torch.equal(wide[1], torch.zeros_like(wide[1]))


def test_decode_attention_with_a_shared_prefix_equals_the_full_cache():
    """A prefix [H, P, D] held once gives the bits of the same keys in the row's own cache."""
    P = kernels.DECODE_SPLIT - 30  # the prefix ends inside the first split
    q, k, v, key_pos, q_pos = _decode_batch([P + 100, P + 7], capacity=P + 100)
    k[1, :, :P], v[1, :, :P] = k[0, :, :P], v[0, :, :P]
    whole = kernels.decode_attention(q, k, v, key_pos, q_pos)
    prefix = (k[0, :, :P].contiguous(), v[0, :, :P].contiguous())
    own_pos = torch.where(key_pos[:, P:] >= 0, key_pos[:, P:], -1)
    shared = kernels.decode_attention(q, k[:, :, P:], v[:, :, P:], own_pos, q_pos, prefix)
    assert torch.equal(shared, whole)


def test_decode_attention_over_a_long_shared_prefix_equals_the_row_alone_and_its_own_cache():
    """Splits inside the prefix serve 16 rows per program: a row gets what it gets alone, in another tile, and
    from the same keys in its own cache (prefix reuse off). Bits here only for a tile's first row: the
    interpreter's numpy products sum other rows of a tile in other orders; bench/kernel_bits.py checks the
    bits of every row on the GPU."""
    P = 2 * kernels.DECODE_SPLIT + 40  # two splits lie wholly inside the prefix
    lengths = [P + n for n in (5, 90, 1, 33, 17, 64, 2, 9, 41, 12, 70, 3, 8, 25, 50, 6, 11, 44)]  # 18 rows: 2 tiles
    q, k, v, key_pos, q_pos = _decode_batch(lengths, capacity=max(lengths))
    k[:, :, :P], v[:, :, :P] = k[:1, :, :P], v[:1, :, :P]  # every row's first P keys are the prefix
    prefix = (k[0, :, :P].contiguous(), v[0, :, :P].contiguous())
    own = (k[:, :, P:], v[:, :, P:], torch.where(key_pos[:, P:] >= 0, key_pos[:, P:], -1))
    shared = kernels.decode_attention(q, *own[:2], own[2], q_pos, prefix)
    whole = kernels.decode_attention(q, k, v, key_pos, q_pos)
    torch.testing.assert_close(shared, whole, rtol=1e-6, atol=1e-7)
    assert torch.equal(shared[[0, 16]], whole[[0, 16]])  # first rows of their tiles
    for rows in (slice(17, 18), slice(3, 9)):  # alone, and in another tile
        alone = kernels.decode_attention(q[rows], own[0][rows], own[1][rows], own[2][rows], q_pos[rows], prefix)
        torch.testing.assert_close(alone, shared[rows], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(shared, _ref_attention(q, k, v, key_pos, q_pos), rtol=1e-5, atol=1e-5)


def test_linear_equals_reference_for_any_row_layout():
    gen = torch.Generator().manual_seed(9)
    w, bias = torch.randn(24, 40, generator=gen), torch.randn(24, generator=gen)
    for m in (1, 16, 37):
        x = torch.randn(2, m, 40, generator=gen)
        torch.testing.assert_close(kernels.linear(x, w, bias), x @ w.T + bias, rtol=1e-5, atol=1e-5)
    strided = torch.randn(40, 30, generator=gen).T  # not row-major: copied before the product
    torch.testing.assert_close(kernels.linear(strided, w), strided @ w.T, rtol=1e-5, atol=1e-5)
