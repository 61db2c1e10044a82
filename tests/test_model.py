"""The native model against an independent reference, and its long-context rules against the spec."""
import math
from collections import Counter
from dataclasses import replace

import pytest
import torch
from checkpoints import tiny_model

from model import KVCache, ops
from model.convert import to_transformers
from model.qwen import logn_scale, ntk_alpha, rope_inv_freq

torch.set_grad_enabled(False)


def small(**kw):
    return tiny_model(vocab_size=512, **kw)


def tokens(batch, length, seed=0):
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch,length", [(1, 1), (1, 17), (3, 40)])
def test_logits_equal_transformers_qwen2(batch, length):
    model = small()
    reference = to_transformers(model)
    ids = tokens(batch, length)
    ours = model(ids)
    theirs = reference(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_padded_reference_equal_transformers_with_mask():
    model = small()
    reference = to_transformers(model)
    ids = tokens(2, 12)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    ours = model(ids, mask)
    theirs = reference(input_ids=ids, attention_mask=mask).logits
    assert (ours[mask.bool()] - theirs[mask.bool()]).abs().max().item() < 1e-4


@pytest.mark.parametrize("windows", [None, (5, 9)])
def test_reference_attention_equals_sdpa(windows):
    model = small(windows=windows)
    ids = tokens(3, 30)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    fast = model(ids, mask)
    model.ops = ops.REFERENCE
    assert torch.allclose(fast[mask.bool()], model(ids, mask)[mask.bool()], atol=1e-5)


@pytest.mark.parametrize("lengths", [(10, 30, 25), (70, 150, 100)])  # the second crosses seq_length 64: NTK + LogN on
def test_left_padded_batch_equals_each_row_alone(lengths):
    model = small()
    width = max(lengths)
    ids = tokens(len(lengths), width, seed=1)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
    batched = model(ids, mask)
    for row, n in enumerate(lengths):
        alone = model(ids[row:row + 1, width - n:])
        assert (batched[row, width - n:] - alone[0]).abs().max().item() < 1e-4


def test_kv_cache_decoding_equals_full_forward():
    model = small()
    ids = tokens(2, 24, seed=2)
    full = model(ids)
    cache = KVCache.empty(model.args, batch=2, max_len=32, dtype=torch.float32, device="cpu")
    rows = torch.arange(2)
    prompt = 10
    positions = torch.arange(prompt).expand(2, -1)
    logits = [model(ids[:, :prompt], positions=positions, kv=cache.prefill(rows, positions))[:, -1]]
    for t in range(prompt, 24):
        step = torch.full((2, 1), t)
        logits.append(model(ids[:, t:t + 1], positions=step, kv=cache.decode(step, step))[:, -1])
    decoded = torch.stack(logits[:-1], dim=1)
    assert (decoded - full[:, prompt - 1:23]).abs().max().item() < 1e-4


def test_decoding_keeps_the_prefill_ntk_alpha():
    """As the original: alpha is chosen from the prefill length and kept for every decode step."""
    model = small()  # seq_length 64
    ids = tokens(1, 140, seed=3)
    cache = KVCache.empty(model.args, batch=1, max_len=140, dtype=torch.float32, device="cpu")
    positions = torch.arange(100)[None]
    model(ids[:, :100], positions=positions, kv=cache.prefill(torch.arange(1), positions))  # alpha(100) = 3
    step = torch.tensor([[130]])  # 131 tokens would give alpha 7 in a fresh forward
    model(ids[:, 100:101], positions=step, kv=cache.decode(step - 30, step))
    assert cache.ntk_len.tolist() == [100]
    assert ntk_alpha(cache.ntk_len, 64).item() == 3


def test_shared_prefix_equals_full_forward():
    model = small(windows=(6, 40))
    ids = tokens(3, 26, seed=4)
    prefix_len = 11
    prefix = KVCache.empty(model.args, batch=1, max_len=prefix_len, dtype=torch.float32, device="cpu")
    pos = torch.arange(prefix_len)[None]
    model(ids[:1, :prefix_len], positions=pos, kv=prefix.prefill(torch.arange(1), pos, ntk_len=torch.tensor([26])))
    suffix = ids[:, prefix_len:].clone()
    suffix[:, :] = ids[0, prefix_len:]
    suffix[1, 5:] = ids[1, prefix_len + 5:]  # rows differ after a while
    with_prefix = model(suffix, prefix=prefix)
    for row in range(3):
        full = model(torch.cat([ids[:1, :prefix_len], suffix[row:row + 1]], dim=1))[0, prefix_len:]
        assert (with_prefix[row] - full).abs().max().item() < 1e-4


@pytest.mark.parametrize("length,alpha", [(2048, 1), (2049, 3), (4096, 3), (4097, 7), (8192, 7), (8193, 15),
                                          (16384, 15), (16385, 31), (1, 1)])
def test_ntk_alpha_at_the_boundaries(length, alpha):
    assert ntk_alpha(torch.tensor([length]), 2048).item() == alpha


@pytest.mark.parametrize("alpha,base", [(1, 10000.0), (3, 30527.7), (7, 72195.9), (15, 156588.3), (31, 327366.4)])
def test_ntk_base(alpha, base):
    inv_freq = rope_inv_freq(torch.tensor([float(alpha)]), 10000.0, 128)
    assert inv_freq[0, 0].item() == 1.0
    # inv_freq[i] = base' ** (-2i/128); recover base' from the second frequency
    recovered = inv_freq[0, 1].double().item() ** (-128 / 2)
    assert recovered == pytest.approx(base, rel=2e-4)


def test_ntk_thresholds_follow_seq_length():  # v1.1: seq_length 8192
    got = ntk_alpha(torch.tensor([8192, 8193, 16384, 16385, 32768]), 8192).tolist()
    assert got == [1, 3, 3, 7, 7]


@pytest.mark.parametrize("position,factor", [(0, 1.0), (2047, 1.0), (4095, 1.0909), (8191, 1.1818), (16383, 1.2727)])
def test_logn_factors(position, factor):
    assert logn_scale(torch.tensor([position]), 2048).item() == pytest.approx(factor, abs=1e-4)
    assert logn_scale(torch.tensor([2048]), 2048).item() == pytest.approx(math.log(2049) / math.log(2048))


def test_window_at_least_length_is_exactly_full_attention():
    ids = tokens(2, 50, seed=5)
    full = small()(ids)
    assert torch.equal(small(windows=(50, 80))(ids), full)
    assert torch.equal(small(windows=(1000, 1000))(ids), full)


def test_token_outside_every_window_has_no_influence():
    model = small(windows=(4, 4))  # receptive field: 2 layers x 3 tokens back
    ids = tokens(1, 30, seed=6)
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 512
    a, b = model(ids), model(changed)
    assert torch.equal(a[0, 7:], b[0, 7:])  # position 7 is 7 tokens after the change: out of reach
    assert not torch.allclose(a[0, 1:7], b[0, 1:7])  # within reach it does matter


def test_window_layers_use_ntk_of_their_own_span():
    """A layer whose window fits the training length keeps alpha 1 even when the sequence is long."""
    ids = tokens(1, 100, seed=7)
    short_windows = small(windows=(64, 64))(ids)
    no_ntk_windows = small(windows=(64, 64), use_dynamic_ntk=False)(ids)
    assert torch.allclose(short_windows, no_ntk_windows, atol=1e-6)
    assert not torch.allclose(small()(ids), small(use_dynamic_ntk=False)(ids), atol=1e-3)


def recording_ops(base=ops.FAST):
    """`base` with every op counted: which layers call what."""
    calls = Counter()

    def counted(name):
        def run(*args):
            calls[name] += 1
            return getattr(base, name)(*args)
        return run

    names = ("linear", "add_rms_norm", "rope_qkv", "swiglu", "attention", "decode_attention")
    return replace(base, name="recording", **{n: counted(n) for n in names}), calls


def test_every_layer_computes_through_the_model_op_set():
    model = small()
    model.ops, calls = recording_ops()
    L = model.args.n_layer
    cache = KVCache.empty(model.args, batch=2, max_len=12, dtype=torch.float32, device="cpu")
    positions = torch.arange(10).expand(2, -1)
    model(tokens(2, 10), positions=positions, kv=cache.prefill(torch.arange(2), positions))
    prefill = {"linear": 5 * L + 1, "add_rms_norm": 2 * L + 1, "rope_qkv": L, "swiglu": L, "attention": L}
    assert calls == prefill
    step = torch.full((2, 1), 10)
    model(tokens(2, 1), positions=step, kv=cache.decode(step, step))  # one token over the cache: decoding
    assert calls == {**{k: 2 * n for k, n in prefill.items()}, "attention": L, "decode_attention": L}


def test_op_sets_are_chosen_by_kernels_and_device():
    assert ops.select("invariant", "cuda") is ops.INVARIANT and ops.select("fast", "cuda:1") is ops.FAST
    assert ops.select("invariant", "cpu").name == ops.select("fast", "cpu").name == "cpu"  # invariant by batching
    with pytest.raises(ValueError, match="unknown kernel set"):
        ops.select("sdpa", "cuda")
    assert small().ops is ops.FAST  # a fresh model computes with the library kernels
