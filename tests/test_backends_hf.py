"""The transformers backend on a tiny random Qwen in fp32: batched runs equal one request at a time (and an
independent full forward); --backend hf refuses the switches transformers' Qwen2 lacks, before any weights load."""
import json
import random
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from checkpoints import tiny_model
from fixtures import find_run
from eval.api import ChoiceRequest, GenerateRequest, LoglikelihoodRequest
from eval.backends import HFBackend, NativeBackend, stop_rules_met
from eval.runner import main

CHOICES = (32, 33, 34, 35)  # "A".."D"


@pytest.fixture(scope="module")
def model():
    # prompts + new tokens stay under seq_length (64): dynamic NTK and LogN are inactive, so the native
    # model computes what transformers' Qwen2 computes
    return tiny_model(seed=3)


def hf(model, tok, batch_size):
    return HFBackend.from_native(model, tok, batch_size=batch_size, progress=False)


def ragged(n: int, seed: int) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    return [tuple(rng.randrange(100, 20000) for _ in range(rng.randrange(2, 40))) for _ in range(n)]


def full_forward(backend, tokens) -> torch.Tensor:
    """The reference: transformers' own forward of one unpadded sequence, every position's logits."""
    return backend.model(input_ids=torch.tensor([tokens])).logits[0].float()


@pytest.mark.parametrize("batch_size", [4, None])
def test_batched_choice_scores_equal_one_at_a_time(model, tok, batch_size):
    requests = [ChoiceRequest("", s, CHOICES) for s in ragged(11, seed=0)]
    alone = hf(model, tok, 1).choice(requests)
    batched = hf(model, tok, batch_size)
    got = batched.choice(requests)
    for r, a, b in zip(requests, alone, got):
        reference = full_forward(batched, r.tokens)[-1]
        assert b.logits == pytest.approx(reference[list(CHOICES)].tolist(), abs=1e-4)
        assert b.logits == pytest.approx(a.logits, abs=1e-4) and b.parity_probs == pytest.approx(a.parity_probs)
        assert max(range(4), key=b.logits.__getitem__) == max(range(4), key=a.logits.__getitem__)
        assert b.top_in_choices == a.top_in_choices == (int(reference.argmax()) in CHOICES)


def test_memory_sized_batches_run_longest_first(model, tok, monkeypatch):
    backend = hf(model, tok, None)
    requests = [LoglikelihoodRequest("", s) for s in ragged(20, seed=1)]
    longest = max(len(r.tokens) for r in requests)
    row = backend._activation_bytes(longest) + 2 * longest * 64 * 4  # loglikelihood's cost of the longest row
    logit_chunk = 3 * 4 * backend.LOGIT_ROWS * 151936  # per batch, whatever its rows
    monkeypatch.setattr(backend, "CPU_BUDGET", logit_chunk + 3 * row)
    calls = []
    got = backend.loglikelihood(requests, on_done=lambda done: calls.append([i for i, _ in done]))
    lengths = [[len(requests[i].tokens) for i in call] for call in calls]
    assert len(calls[0]) == 3 and max(map(len, calls)) > 3  # shorter rows: more of them fit the budget
    assert [x for call in lengths for x in call] == sorted((len(r.tokens) for r in requests), reverse=True)
    assert sorted(i for call in calls for i in call) == list(range(20))
    alone = hf(model, tok, 1).loglikelihood(requests)
    assert [g.nll for g in got] == pytest.approx([a.nll for a in alone], rel=1e-5)


def with_stops(requests, outputs, tok):
    """Stops that fire mid-generation, taken from each row's unstopped output: a stop token, a stop string,
    two groups of stop strings; every fourth row samples instead."""
    out = []
    for i, (r, g) in enumerate(zip(requests, outputs)):
        text = g.text.replace("\ufffd", "")
        cut = len(text) // 3
        if i % 4 == 0:
            r = replace(r, stop_ids=(g.tokens[5],))
        elif i % 4 == 1 and text[cut:cut + 2]:
            r = replace(r, stop=((text[cut:cut + 2], "never in the text"),))
        elif i % 4 == 2 and text[cut:cut + 1]:
            r = replace(r, stop=((text[-1:],), (text[cut:cut + 1],)))
        elif i % 4 == 3:
            r = replace(r, temperature=0.8, seed=100 + i)
        out.append(r)
    return out


def test_batched_generation_equals_one_at_a_time(model, tok):
    free = [GenerateRequest("", p, max_new_tokens=10 + i % 5) for i, p in enumerate(ragged(8, seed=2))]
    unstopped = hf(model, tok, 1).generate(free)
    requests = with_stops(free, unstopped, tok)
    alone = hf(model, tok, 1).generate(requests)
    for batch_size in (3, None):
        assert hf(model, tok, batch_size).generate(requests) == alone
    assert [len(g.tokens) for g in unstopped] == [r.max_new_tokens for r in free]
    for r, g, u in zip(requests, alone, unstopped):
        if r.stop_ids:  # ends before its first stop token
            assert g.finish == "stop" and g.tokens == u.tokens[:u.tokens.index(r.stop_ids[0])]
        elif r.stop:  # ends at the shortest output on which every group matches
            assert g.finish == "stop" and stop_rules_met(r.stop, g.text)
            assert not stop_rules_met(r.stop, tok.decode(g.tokens[:-1])) and u.tokens[:len(g.tokens)] == g.tokens
        elif r.temperature:
            assert g.tokens != u.tokens and len(g.tokens) == r.max_new_tokens
    # greedy and seeded sampling draw the native engine's tokens
    plain = [replace(r, stop=(), stop_ids=()) for r in requests]
    native = NativeBackend(model, tok, progress=False).generate(plain)
    assert [g.tokens for g in hf(model, tok, None).generate(plain)] == [g.tokens for g in native]


@pytest.mark.parametrize("batch_size", [1, 5])
def test_rolling_loglikelihood_matches_a_full_forward(model, tok, batch_size, monkeypatch):
    backend = hf(model, tok, batch_size)
    monkeypatch.setattr(backend, "LOGIT_ROWS", 16)  # several lm_head chunks per batch
    requests = [LoglikelihoodRequest("", s) for s in ragged(9, seed=4)]
    for r, got in zip(requests, backend.loglikelihood(requests)):
        logits = full_forward(backend, r.tokens)[:-1]
        expected = F.cross_entropy(logits, torch.tensor(r.tokens[1:]), reduction="sum").item()
        assert got.n_tokens == len(r.tokens) - 1 and got.nll == pytest.approx(expected, rel=1e-5)


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_hf_backend_refuses_switches_it_cannot_apply(tiny_checkpoint, data_root, tmp_path, capsys):
    """The tiny checkpoint's config turns dynamic NTK and LogN on, as Qwen-7B's does."""
    config_only = tmp_path / "config-only"  # no weight files: a refusal here comes before any weights load
    config_only.mkdir()
    for name in ("config.json", "qwen.tiktoken"):
        shutil.copy(tiny_checkpoint / name, config_only / name)
    out = tmp_path / "out"
    common = ["--data-dir", data_root, "--limit", 2, "--output-dir", out, "--no-progress", "--backend", "hf"]
    mmlu = ["--task", "mmlu", "--subjects", "anatomy", *common]
    for ckpt in (tiny_checkpoint, config_only):
        code, err = cli(capsys, *mmlu, "--model", ckpt)
        assert code == 2 and len(err.splitlines()) == 1
        assert "(config.json use_dynamic_ntk=true and config.json use_logn_attn=true)" in err
        assert "--no-dynamic-ntk --no-logn" in err
    code, err = cli(capsys, *mmlu, "--model", config_only, "--no-dynamic-ntk", "--logn")
    assert code == 2 and "(--logn)" in err
    code, err = cli(capsys, *mmlu, "--model", config_only, "--no-dynamic-ntk", "--no-logn", "--window-attn", "2x16")
    assert code == 2 and err.startswith("error: --window-attn")
    code, err = cli(capsys, "--task", "long_ppl", "--lengths", 32, *common, "--model", config_only,
                    "--no-dynamic-ntk", "--no-logn")
    assert code == 2 and "--task long_ppl" in err
    assert not out.exists()
    code, _ = cli(capsys, *mmlu, "--model", tiny_checkpoint, "--no-dynamic-ntk", "--no-logn")
    run = json.loads((find_run(out, "mmlu-fewshot-ntk_off-logn_off-hf-fp32") / "run.json").read_text())
    assert code == 0 and run["identity"]["switches"] == {"dynamic_ntk": False, "logn": False, "windows": None}


def test_scoring_keeps_no_kv_cache(model, tok, monkeypatch):
    """A forward that only scores must not build transformers' KV cache: 2 x layers x dim values per token
    (Qwen-7B: 0.5 MiB), four times the activations the batch sizing counts; it ran an 80 GB card out of memory."""
    backend = hf(model, tok, 4)
    decoder = backend.model.get_decoder()
    forward, caches = decoder.forward, []

    def recording(*args, **kwargs):
        out = forward(*args, **kwargs)
        caches.append([key for key in ("cache", "past_key_values") if out.get(key) is not None])  # by version
        return out

    monkeypatch.setattr(decoder, "forward", recording)
    backend.choice([ChoiceRequest("", s, CHOICES) for s in ragged(5, seed=5)])
    backend.loglikelihood([LoglikelihoodRequest("", s) for s in ragged(5, seed=6)])
    assert len(caches) == 4 and not any(caches)


def out_of_memory_above(backend, rows: int, monkeypatch) -> list[int]:
    """The decoder raises the CUDA out-of-memory error on any batch of more than `rows` rows, as a device
    would; returns the batch sizes it was called with."""
    import functools

    decoder = backend.model.get_decoder()
    forward, sizes = decoder.forward, []

    @functools.wraps(forward)
    def limited(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        batch = len(ids if ids is not None else kwargs["inputs_embeds"])
        sizes.append(batch)
        if batch > rows:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (a fake device error for {batch} rows)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(decoder, "forward", limited)
    return sizes


def test_out_of_memory_halves_the_batch_and_goes_on(model, tok, monkeypatch, capsys):
    choices = [ChoiceRequest("", s, CHOICES) for s in ragged(11, seed=7)]
    rolling = [LoglikelihoodRequest("", s) for s in ragged(9, seed=8)]
    generations = [GenerateRequest("", p, max_new_tokens=6) for p in ragged(7, seed=9)]
    alone = hf(model, tok, 1)
    expected = alone.choice(choices), alone.loglikelihood(rolling), alone.generate(generations)
    backend = hf(model, tok, None)  # sized from memory: the whole list fits CPU_BUDGET at first
    sizes = out_of_memory_above(backend, 3, monkeypatch)
    got = backend.choice(choices), backend.loglikelihood(rolling), backend.generate(generations)
    assert sizes[:3] == [11, 5, 2] and max(sizes[3:]) > 3  # halved until it fits; each request list starts afresh
    for mine, reference in zip(got[0], expected[0]):
        assert mine.logits == pytest.approx(reference.logits, abs=1e-4)
    assert [g.nll for g in got[1]] == pytest.approx([a.nll for a in expected[1]], rel=1e-5)
    assert got[2] == expected[2]
    assert "out of memory" in capsys.readouterr().err


def test_out_of_memory_on_one_row_is_one_line(model, tok, monkeypatch):
    from eval.api import UserError

    backend = hf(model, tok, None)
    out_of_memory_above(backend, 0, monkeypatch)
    with pytest.raises(UserError, match="out of memory on one row of"):
        backend.choice([ChoiceRequest("", s, CHOICES) for s in ragged(3, seed=10)])
