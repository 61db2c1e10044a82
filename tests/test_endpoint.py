"""--backend api against a real OpenAI-compatible HTTP server on 127.0.0.1 (tests/openai_server.py) that
serves a model through the native engine: the api backend must give the native backend's answers."""
from __future__ import annotations

import argparse
import math
import socket

import pytest
from checkpoints import tiny_model, vocab_file
from openai_server import Behaviour, OpenAIServer, ServedModel

from eval import runner
from eval.api import (
    ChoiceRequest,
    GenerateRequest,
    LoglikelihoodRequest,
    UserError,
    chat_request,
)
from eval.backends import NativeBackend, stop_rules_met
from eval.data import DataSource
from eval.endpoint import Capabilities, chatml_messages, connect, stop_rules_cut
from eval.pipeline import plan_task
from eval.registry import get_task
from model import QwenTokenizer

KEY = "sk-test-0123456789"  # never to be found in a run's files or output
CHOICE_STRINGS = (" A", " B", " C", " D")


@pytest.fixture(scope="module")
def tok() -> QwenTokenizer:
    return QwenTokenizer(vocab_file())


@pytest.fixture(scope="module")
def served(tok) -> ServedModel:
    return ServedModel(tiny_model(seed=3), tok, "tiny-random")


def endpoint_args(url: str, **kw) -> argparse.Namespace:
    return argparse.Namespace(**{"base_url": url, "api_model": None, "api_key_env": None, "concurrency": 4, **kw})


def requests_of_each_kind(tok) -> dict[str, list]:
    prompts = [f"Question {i}: which letter comes after {chr(65 + i)}?\nAnswer:" for i in range(4)]
    ids = [tuple(tok.encode(p)) for p in prompts]
    choice_ids = tuple(tok.encode(s)[-1] for s in CHOICE_STRINGS)
    return {
        "choice": [ChoiceRequest(p, i, choice_ids) for p, i in zip(prompts, ids)],
        "generate": [GenerateRequest(p, i, 12, stop=(("e",),), stop_ids=(tok.eod_id,)) for p, i in zip(prompts, ids)]
        + [GenerateRequest(p, i, 12, stop=(("a", "o"), ("e",)), stop_ids=(tok.eod_id,)) for p, i in zip(prompts, ids)]
        + [chat_request(tok, p, max_new_tokens=12) for p in prompts],
        "loglikelihood": [LoglikelihoodRequest(p, i) for p, i in zip(prompts, ids)],
    }


# ---- pieces ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("groups", [(("\n\n", "Question:"),), (("\n\n", "def "), ("\nclass", "\ndef", "\n#")), ()])
def test_the_cut_is_the_shortest_prefix_on_which_the_stop_rules_hold(groups):
    text = "a = 1\n\ndef f():\n    pass\n# done\nQuestion: next\n\nclass X"
    cut = stop_rules_cut(groups, text)
    holds = [n for n in range(len(text) + 1) if stop_rules_met(groups, text[:n])]
    assert cut == (holds[0] if holds else None)


def test_chat_messages_render_back_to_the_native_chatml(tok):
    request = chat_request(tok, "Which is larger, 7 or 9?\n\nA. 7\nB. 9\n")
    messages = chatml_messages(request.prompt)
    assert messages == [{"role": "system", "content": "You are a helpful assistant."},
                        {"role": "user", "content": request.query}]
    with pytest.raises(UserError, match="not plain ChatML"):
        chatml_messages("Question: no turns here")


# ---- the api backend against the native one on each request kind ---------------------------------------
def serve_both(backend, requests: dict) -> dict:
    return {kind: getattr(backend, kind)(rs) for kind, rs in requests.items()}


def assert_same_answers(api: dict, native: dict, requests: dict, *, exact_values: bool = True) -> None:
    for a, n in zip(api["choice"], native["choice"]):
        assert a.logits.index(max(a.logits)) == n.logits.index(max(n.logits))  # the prediction
        assert a.top_in_choices == n.top_in_choices
        if exact_values:  # log-probabilities are the logits shifted by one constant per question
            shift = [x - y for x, y in zip(a.logits, n.logits)]
            assert max(shift) - min(shift) < 1e-4
            assert a.parity_probs == pytest.approx(n.parity_probs, abs=1e-6)
    for r, a, n in zip(requests["generate"], api["generate"], native["generate"]):
        cut = stop_rules_cut(r.stop, n.text)  # native keeps the rest of the token that completed the rule
        assert (a.text, a.finish) == (n.text if cut is None else n.text[:cut], n.finish)
    for a, n in zip(api["loglikelihood"], native["loglikelihood"]):
        assert a.n_tokens == n.n_tokens and math.isclose(a.nll, n.nll, rel_tol=1e-5)


@pytest.mark.parametrize("behaviour", [Behaviour(), Behaviour(max_logprobs=1)], ids=["top20", "echo-for-the-rest"])
def test_api_answers_equal_native_answers(tok, served, behaviour):
    requests = requests_of_each_kind(tok)
    native = serve_both(NativeBackend(served.model, tok, progress=False), requests)
    with OpenAIServer(served, behaviour) as server:
        endpoint = connect(endpoint_args(server.url))
        api = serve_both(endpoint.backend(tok, progress=False), requests)
    assert endpoint.can == Capabilities(behaviour.max_logprobs, True)
    assert_same_answers(api, native, requests)


def test_without_logprobs_choices_are_generate_and_extract_and_said_so(tok, served, data_root, tmp_path, capsys):
    requests = requests_of_each_kind(tok)["choice"]
    native = NativeBackend(served.model, tok, progress=False).generate(
        [GenerateRequest(r.prompt, r.tokens, 1) for r in requests])
    plans = {name: plan_task(get_task(name), "fewshot", DataSource(data_root), tok, subjects=subjects, limit=1,
                             options={"lengths": [64]}, run_dir=tmp_path / name)
             for name, subjects in (("mmlu", ["anatomy"]), ("long_ppl", None))}
    with OpenAIServer(served, Behaviour(max_logprobs=0, echo=False)) as server:
        endpoint = connect(endpoint_args(server.url))
        api = endpoint.backend(tok, progress=False).choice(requests)
        _, identity = endpoint.describe([plans["mmlu"]])
        with pytest.raises(UserError, match=r"--task long_ppl .*\(echo\).*cannot run"):
            endpoint.describe([plans["long_ppl"]])
    assert endpoint.can == Capabilities(0, False)
    assert "generate-and-extract" in capsys.readouterr().out
    assert identity["endpoint"]["served"]["choice"].startswith("generate-and-extract")
    for r, a, n in zip(requests, api, native):  # 1.0 marks the choice the greedy token is, if any
        assert a.logits == tuple(float(c == n.tokens[0]) for c in r.choice_ids) if n.tokens else not any(a.logits)


def test_429_and_500_at_random_are_retried_until_answered(tok, served):
    requests = requests_of_each_kind(tok)
    native = serve_both(NativeBackend(served.model, tok, progress=False), requests)
    flaky = Behaviour(failure_rate=0.4, max_failures=25, seed=7)
    with OpenAIServer(served, flaky) as server:
        api = serve_both(connect(endpoint_args(server.url), backoff=0.01).backend(tok, progress=False), requests)
        failures = server.failures
    assert failures > 5  # the retries were needed
    assert_same_answers(api, native, requests)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = runner.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", ["wrong key", "unset variable", "no key", "dead port", "unknown model"])
def test_endpoint_mistakes_give_one_line_and_exit_2(case, served, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QWEN_EVAL_TEST_KEY", "sk-wrong" if case == "wrong key" else KEY)
    with OpenAIServer(served, Behaviour(key=KEY)) as server:
        url = server.url
        flags = {"wrong key": ["--api-key-env", "QWEN_EVAL_TEST_KEY"], "unset variable": ["--api-key-env", "NO_SUCH_VAR"],
                 "no key": [], "dead port": ["--api-key-env", "QWEN_EVAL_TEST_KEY"],
                 "unknown model": ["--api-key-env", "QWEN_EVAL_TEST_KEY", "--api-model", "tiny-randon"]}[case]
        if case == "dead port":
            with socket.socket() as s:  # a port nothing listens on
                s.bind(("127.0.0.1", 0))
                url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
        code, out, err = run_cli(["--task", "mmlu", "--backend", "api", "--base-url", url, "--tokenizer",
                                  str(vocab_file()), "--output-dir", str(tmp_path), "--no-progress", *flags], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    expected = {"wrong key": "rejected the key", "unset variable": "--api-key-env NO_SUCH_VAR",
                "no key": "rejected the key", "dead port": "no answer", "unknown model": "did you mean 'tiny-random'"}
    assert expected[case] in err and KEY not in err + out
    assert not list(tmp_path.iterdir())  # nothing planned, nothing written
