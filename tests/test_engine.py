"""The engine's fast paths (shared prefixes, batching, static-cache decoding) against naive loops."""
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # the invariant op set's kernels, before they are defined

from checkpoints import tiny_model

from model.engine import Engine

torch.set_grad_enabled(False)


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab_size=512, seed=11)


def random_prompts(n, lo, hi, seed=0, prefix=()):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=gen))
        out.append(list(prefix) + torch.randint(0, 512, (length,), generator=gen).tolist())
    return out


def naive_greedy(model, prompt, max_new, stop_ids=()):
    ids = list(prompt)
    new = []
    alpha_len = len(prompt)  # the original keeps the prefill alpha while decoding
    for _ in range(max_new):
        x = torch.tensor(ids)[None]
        model_args = model.args
        hidden = model.hidden(x) if len(ids) == alpha_len else _hidden_with_fixed_alpha(model, x, alpha_len)
        token = int(model.logits(hidden[0, -1]).argmax())
        if token in stop_ids:
            break
        new.append(token)
        ids.append(token)
        model.args = model_args
    return new


def _hidden_with_fixed_alpha(model, x, alpha_len):
    from model import KVCache

    cache = KVCache.empty(model.args, 1, x.shape[1], torch.float32, "cpu")
    pos = torch.arange(x.shape[1])[None]
    return model.hidden(x, positions=pos, kv=cache.prefill(torch.zeros(1, dtype=torch.long), pos, torch.tensor([alpha_len])))


@pytest.mark.parametrize("max_batch", [1, 3, None])
def test_generation_equals_naive_greedy(model, max_batch):
    prompts = random_prompts(5, 3, 20, seed=1, prefix=[7, 8, 9, 10])
    max_new = [6, 9, 4, 12, 7]
    engine = Engine(model, max_batch=max_batch, sync_every=4, progress=False)
    got = engine.generate(prompts, max_new, [()] * 5, shared_prefix=[4] * 5)
    for prompt, n, g in zip(prompts, max_new, got):
        assert list(g.tokens) == naive_greedy(model, prompt, n)
        assert g.finish == "length"


def test_generation_crossing_the_training_length_keeps_prefill_alpha(model):
    prompts = random_prompts(3, 58, 70, seed=2)  # seq_length 64: some prompts start under, decode goes over
    engine = Engine(model, max_batch=2, sync_every=5, progress=False)
    got = engine.generate(prompts, [12] * 3, [()] * 3)
    for prompt, g in zip(prompts, got):
        assert list(g.tokens) == naive_greedy(model, prompt, 12)


def test_stop_tokens_and_stop_rules(model):
    prompts = random_prompts(4, 5, 15, seed=3)
    reference = [naive_greedy(model, p, 20) for p in prompts]
    stop_token = reference[0][3]
    engine = Engine(model, max_batch=2, sync_every=7, progress=False)
    got = engine.generate(prompts, [20] * 4, [(stop_token,)] * 4)
    for ref, g in zip(reference, got):
        expected = ref[: ref.index(stop_token)] if stop_token in ref else ref
        assert list(g.tokens) == expected
    # a text rule: stop once 5 tokens exist; the result is cut at exactly 5 whatever the sync phase
    for sync in (1, 3, 8):
        engine = Engine(model, max_batch=3, sync_every=sync, progress=False)
        got = engine.generate(prompts, [20] * 4, [()] * 4, stop_check=lambda i, new: len(new) >= 5)
        assert [list(g.tokens) for g in got] == [ref[:5] for ref in reference]
        assert all(g.finish == "stop" for g in got)


@pytest.mark.parametrize("max_batch", [1, 4, None])
def test_choice_scores_equal_full_forward(model, max_batch):
    shots = list(range(100, 130))
    prompts = random_prompts(7, 2, 25, seed=4, prefix=shots)
    choices = [[1, 2, 3, 4]] * 7
    engine = Engine(model, max_batch=max_batch, progress=False)
    got = engine.score_choices(prompts, choices, shared_prefix=[len(shots)] * 7)
    for prompt, r in zip(prompts, got):
        logits = model(torch.tensor(prompt)[None])[0, -1]
        assert torch.allclose(torch.tensor(r.logits), logits[[1, 2, 3, 4]], atol=1e-4)
        assert r.top_id == int(logits.argmax())
        assert torch.allclose(torch.tensor(r.parity_probs), logits.softmax(-1)[[1, 2, 3, 4]].softmax(-1), atol=1e-5)


def test_prefix_groups_split_by_ntk_alpha(model):
    shots = list(range(200, 250))  # 50 tokens; seq_length 64: some prompts pass it, others not
    prompts = random_prompts(6, 5, 40, seed=5, prefix=shots)
    engine = Engine(model, max_batch=3, progress=False)
    got = engine.score_choices(prompts, [[5, 6]] * 6, shared_prefix=[50] * 6)
    for prompt, r in zip(prompts, got):
        logits = model(torch.tensor(prompt)[None])[0, -1, [5, 6]]
        assert torch.allclose(torch.tensor(r.logits), logits, atol=1e-4)


def test_a_prefix_of_one_request_goes_whole_only_where_that_keeps_the_bits(model):
    """With the invariant kernels a row's bits are the same with its prefix shared or in its own prompt, so a
    prefix that only one request reads is not computed apart; the library kernels round the two ways
    differently, so every prefix stays shared there."""
    from model import ops
    from model.planner import Planner

    a, b = list(range(100, 120)), list(range(200, 230))
    prompts, shared = [a + [1, 2], b + [3], b + [4, 5], [7, 8, 9]], [20, 30, 30, 0]
    saved = model.ops
    try:
        for op_set, expected in ((ops.CPU, [(0, [3]), (20, [0]), (30, [1, 2])]),
                                 (ops.INVARIANT, [(0, [3, 0]), (30, [1, 2])])):
            model.ops = op_set
            groups = Planner(model, None, share_prefix=True).groups(prompts, shared, [len(p) for p in prompts])
            assert sorted((len(g.prefix), g.members) for g in groups) == expected
    finally:
        model.ops = saved


def test_one_request_prefixes_are_served_in_one_batch(model):
    """A quick check (one document per subject, each behind its own shots): one forward for all, not a
    prefix forward and a scoring forward per subject; the same scores as with the prefixes held apart."""
    from dataclasses import replace

    from model import ops

    prompts = [list(range(100 + 20 * k, 120 + 20 * k)) + [k + 1, k + 2] for k in range(3)]
    saved, served = model.ops, {}
    try:
        for exact in (False, True):
            model.ops = replace(ops.CPU, prefix_exact=exact)
            engine = Engine(model, progress=False)
            served[exact] = engine.score_choices(prompts, [[1, 2]] * 3, shared_prefix=[20] * 3), engine.stats["forwards"]
    finally:
        model.ops = saved
    assert served[False][1] == 3 and served[True][1] == 1
    for whole, apart in zip(served[True][0], served[False][0]):
        assert whole.logits == pytest.approx(apart.logits, abs=1e-4)


@pytest.mark.parametrize("max_batch", [1, 2, None])
def test_loglikelihood_equals_full_forward(model, max_batch):
    seqs = random_prompts(4, 10, 140, seed=6)
    engine = Engine(model, max_batch=max_batch, progress=False, loss_chunk=7)
    got = engine.loglikelihood(seqs)
    for seq, (nll, n) in zip(seqs, got):
        x = torch.tensor(seq)[None]
        logp = model(x)[0, :-1].log_softmax(-1)
        expected = -logp.gather(1, x[0, 1:, None]).sum().item()
        assert n == len(seq) - 1
        assert nll == pytest.approx(expected, rel=1e-5)


def test_loglikelihood_switches_apply_per_request(model):
    seq = random_prompts(1, 150, 151, seed=7)[0]
    engine = Engine(model, progress=False)
    plain, ntk = engine.loglikelihood([seq, seq], switches=[{"dynamic_ntk": False, "logn": False}, {}])
    assert plain[0] != ntk[0]
    assert model.args.use_dynamic_ntk  # restored afterwards


def test_results_come_back_through_on_done_in_batches(model):
    prompts = random_prompts(5, 3, 9, seed=8)
    seen = []
    engine = Engine(model, max_batch=2, progress=False)
    engine.score_choices(prompts, [[1, 2]] * 5, on_done=lambda done: seen.append([i for i, _ in done]))
    assert sorted(i for batch in seen for i in batch) == list(range(5))
    assert max(len(b) for b in seen) <= 2


def test_sampling_is_reproducible_and_independent_of_batching(model):
    prompts = random_prompts(4, 3, 12, seed=9)
    runs = []
    for max_batch, sync in ((1, 3), (4, 8)):
        engine = Engine(model, max_batch=max_batch, sync_every=sync, progress=False)
        runs.append(engine.generate(prompts, [10] * 4, [()] * 4, temperature=[1.0, 1.0, 0.0, 1.0], seed=[0, 1, 0, 0]))
    assert runs[0] == runs[1]
    greedy = Engine(model, progress=False).generate(prompts, [10] * 4, [()] * 4)
    assert runs[0][2] == greedy[2]  # temperature 0 is greedy
    assert runs[0][0].tokens != greedy[0].tokens  # temperature 1 over a near-flat distribution


def test_gumbel_noise_is_a_function_of_seed_step_and_id():
    from model.decoder import gumbel_noise

    a = gumbel_noise(torch.tensor([3, 3, 4]), torch.tensor([0, 1, 0]), 1000)
    b = gumbel_noise(torch.tensor([3]), torch.tensor([1]), 1000)
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    assert abs(a.mean().item() - 0.5772) < 0.1  # the Gumbel mean (Euler-Mascheroni)


def test_generation_progress_moves_with_tokens(model, monkeypatch):
    """The bar counts the token budget as rows decode (an early stop hands in the rest): it moves at every
    sync, not only when a whole request ends, and ends exactly at the total."""
    updates = []

    class Bar:
        def __init__(self, total, **kw):
            self.total = total

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            updates.append(n)

    monkeypatch.setattr("model.engine.tqdm", Bar)
    prompts = random_prompts(5, 3, 20, seed=2)
    max_new = [30, 9, 4, 25, 7]
    stop = lambda i, new: i == 0 and len(new) >= 12  # request 0 stops early on a text rule
    engine = Engine(model, max_batch=2, sync_every=3, progress=True)
    engine.generate(prompts, max_new, [()] * 5, stop_check=stop)
    assert sum(updates) == sum(max_new)
    assert sum(1 for n in updates if n) > len(prompts)  # more moves than finished requests


def test_only_the_decode_step_takes_decode_attention(model):
    """Prefill and scoring run `attention` whether a prefix is shared or not (so prefix reuse cannot change
    a row's numbers); one-token decode steps run `decode_attention`."""
    from test_model import recording_ops

    saved = model.ops
    model.ops, calls = recording_ops()
    try:
        prompts = random_prompts(4, 3, 12, seed=10, prefix=list(range(40, 60)))
        for share in (True, False):
            Engine(model, progress=False, share_prefix=share).score_choices(prompts, [[1, 2]] * 4, shared_prefix=[20] * 4)
        assert calls["decode_attention"] == 0 and calls["attention"] > 0
        engine = Engine(model, max_batch=2, sync_every=3, progress=False)
        engine.generate(prompts, [5] * 4, [()] * 4, shared_prefix=[20] * 4)
        assert calls["decode_attention"] == engine.stats["decode_steps"] * model.args.n_layer
    finally:
        model.ops = saved


@pytest.mark.slow  # Triton's interpreter runs every program of every kernel in Python
def test_invariant_op_set_serves_what_the_library_kernels_serve(model):
    """The batch-invariant op set wired through model and engine (Triton's interpreter on a CPU): the same
    choice logits with and without prefix reuse, and the same greedy tokens, as the library kernels."""
    pytest.importorskip("triton", minversion="3.7")
    from model import ops

    prompts = random_prompts(2, 2, 6, seed=12, prefix=list(range(60, 68)))
    expected = Engine(model, progress=False).score_choices(prompts, [[1, 2, 3]] * 2, shared_prefix=[8] * 2)
    greedy = Engine(model, progress=False).generate(prompts, [2] * 2, [()] * 2, shared_prefix=[8] * 2)
    saved, model.ops = model.ops, ops.INVARIANT
    try:
        for share in (True, False):
            got = Engine(model, progress=False, share_prefix=share).score_choices(prompts, [[1, 2, 3]] * 2,
                                                                                  shared_prefix=[8] * 2)
            for g, e in zip(got, expected):
                assert g.logits == pytest.approx(e.logits, abs=1e-4)
        assert Engine(model, progress=False).generate(prompts, [2] * 2, [()] * 2, shared_prefix=[8] * 2) == greedy
    finally:
        model.ops = saved
