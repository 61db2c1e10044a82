"""--backend api against a real OpenAI-compatible HTTP server on 127.0.0.1 (tests/openai_server.py) that
serves a model through the native engine: the api backend must give the native backend's answers."""
from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoints import REPO, SHARED, tiny_model, vocab_file
from eval import runner
from eval.api import ChoiceRequest, GenerateRequest, LoglikelihoodRequest, UserError, chat_request
from eval.backends import NativeBackend, stop_rules_met
from eval.data import DataSource
from eval.endpoint import Capabilities, chatml_messages, connect, stop_rules_cut
from eval.pipeline import plan_task
from eval.registry import get_task
from eval.report import find_runs, render_report
from fixtures import find_run, write_run
from model import QwenTokenizer, load_model
from openai_server import Behaviour, OpenAIServer, ServedModel

KEY = "sk-test-0123456789"  # never to be found in a run's files or output
CHOICE_STRINGS = (" A", " B", " C", " D")


@pytest.fixture(scope="module")
def tok() -> QwenTokenizer:
    return QwenTokenizer(vocab_file())


@pytest.fixture(scope="module")
def served(tok) -> ServedModel:
    return ServedModel(tiny_model(seed=3), tok, "tiny-random")


def endpoint_args(url: str, **kw) -> dict:
    """The api backend's options as a run configuration holds them."""
    return {"base_url": url, "api_model": None, "api_key_env": None, "concurrency": 4, **kw}


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
        flags = {"wrong key": ["--api-key-env", "QWEN_EVAL_TEST_KEY"],
                 "unset variable": ["--api-key-env", "NO_SUCH_VAR"],
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


@pytest.mark.parametrize("backend", ["api", "native"])
def test_the_report_marks_api_runs_weights_not_fingerprinted(backend, tmp_path):
    scores = {"parity": {"pred": 1, "correct": False}, "improved": {"pred": 1, "correct": False}}
    write_run(tmp_path / "Qwen-7B" / "gsm8k-fewshot", "gsm8k", "fewshot", [{"doc_id": "gsm8k/0", **scores}],
              identity={"backend": backend})
    row = next(line for line in render_report(tmp_path, find_runs(tmp_path), with_plots=False).splitlines()
               if line.startswith("| GSM8K 8-shot"))
    assert ("weights not fingerprinted" in row) == (backend == "api")


@pytest.mark.parametrize("flags, expected", [
    (["--backend", "api"], "--backend api needs --base-url URL"),
    (["--base-url", "http://127.0.0.1:1/v1"], "--base-url applies to --backend api only"),
    (["--backend", "api", "--base-url", "http://127.0.0.1:1/v1", "--concurrency", "0"], "--concurrency 0"),
    (["--backend", "api", "--base-url", "http://127.0.0.1:1/v1", "--no-logn"], "--logn: a served model"),
])
def test_api_flag_mistakes_are_refused_before_connecting(flags, expected, tmp_path, capsys):
    code, _, err = run_cli(["--task", "gsm8k", "--output-dir", str(tmp_path), *flags], capsys)
    assert code == 2 and err.startswith(f"error: {expected}") and len(err.strip().splitlines()) == 1, err


# ---- end to end through the command line, on a trained model --------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(request, tmp_path_factory) -> Path:
    """tiny-qwen-256 unpacked (a trained model, so generations stop and vary), else a tiny random one."""
    shared = SHARED / "models" / "tiny-qwen-256"
    if not shared.exists():
        return request.getfixturevalue("tiny_checkpoint")
    folder = tmp_path_factory.mktemp("ckpt") / "tiny-qwen-256"
    folder.mkdir()
    for name in ("config.json", "generation_config.json", "qwen.tiktoken", "tokenizer_config.json"):
        shutil.copy(shared / name, folder / name)
    with gzip.open(shared / "model.safetensors.gz") as packed, open(folder / "model.safetensors", "wb") as out:
        shutil.copyfileobj(packed, out)
    return folder


@pytest.fixture(scope="module")
def trained(checkpoint, tok) -> ServedModel:
    return ServedModel(load_model(checkpoint, dtype="fp32", device="cpu"), tok, "tiny-qwen-256")


E2E_RUNS = (  # (task, mode, flags): a few documents of the fixture data each
    ("mmlu", "fewshot", ["--subjects", "anatomy,astronomy"]), ("ceval", "fewshot", ["--subjects", "logic"]),
    ("gsm8k", "fewshot", []), ("humaneval", "fewshot", ["--allow-code-execution"]),
    ("long_ppl", "fewshot", ["--lengths", "64,128"]), ("cmmlu", "chat", ["--subjects", "agronomy"]),
    ("gsm8k", "chat", ["--limit", "1"]),
)


def cli_args(out: Path, data_root: Path, task: str, mode: str, *extra: str) -> list[str]:
    return ["--task", task, "--mode", mode, "--data-dir", str(data_root), "--limit", "2", "--no-progress",
            "--output-dir", str(out), *extra]


def api_flags(url: str) -> list[str]:
    return ["--backend", "api", "--base-url", url, "--api-key-env", "QWEN_EVAL_TEST_KEY", "--tokenizer",
            str(vocab_file()), "--concurrency", "3"]


def records(run_dir: Path) -> dict[str, dict]:
    lines = (run_dir / "samples.jsonl").read_text().splitlines()
    return {r["doc_id"]: r for r in map(json.loads, lines)}


def comparable(record: dict) -> dict:
    """A record without what may differ: raw responses (texts keep the stop token's tail natively), the
    checksum, and the sandbox's verdicts (a loaded machine can turn a failure into a memory crash)."""
    def completions_only(value):
        if isinstance(value, list) and value and isinstance(value[0], dict) and "completion" in value[0]:
            return [sample["completion"] for sample in value]
        return value

    return {k: completions_only(v) for k, v in record.items() if k not in ("responses", "checksum")}


def assert_same_records(api: dict, native: dict) -> None:
    """Every document's scores; a choice's log-probabilities are its logits shifted by one constant, a
    perplexity row's summed NLL is the same within fp32 tolerance."""
    assert api.keys() == native.keys() and api
    for doc_id in native:
        a, n = comparable(api[doc_id]), comparable(native[doc_id])
        if "logits" in n:
            shift = [x - y for x, y in zip(a.pop("logits"), n.pop("logits"))]
            assert max(shift) - min(shift) < 1e-3, doc_id
            assert a.pop("parity_probs") == pytest.approx(n.pop("parity_probs"), abs=1e-4), doc_id
        if "rows" in n:
            for row, cell in n.pop("rows").items():
                assert a["rows"][row]["n_tokens"] == cell["n_tokens"]
                assert math.isclose(a["rows"][row]["nll"], cell["nll"], rel_tol=1e-5), (doc_id, row)
            a.pop("rows")
        assert a == n, doc_id


@pytest.mark.slow
def test_every_task_through_the_endpoint_equals_the_native_run(trained, checkpoint, data_root, tmp_path, capsys,
                                                               monkeypatch):
    monkeypatch.setenv("QWEN_EVAL_TEST_KEY", KEY)
    with OpenAIServer(trained, Behaviour(key=KEY)) as server:
        for task, mode, flags in E2E_RUNS:
            native = cli_args(tmp_path / "native", data_root, task, mode, *flags, "--model", str(checkpoint))
            assert runner.main(native) == 0
            assert runner.main(cli_args(tmp_path / "api", data_root, task, mode, *flags, *api_flags(server.url))) == 0
    out = capsys.readouterr().out
    assert "long_ppl (fewshot): a served model cannot switch" in out and KEY not in out
    for task, mode, _ in E2E_RUNS:
        api_dir = find_run(tmp_path / "api", f"{task}-{mode}-api")
        assert_same_records(records(api_dir), records(find_run(tmp_path / "native", f"{task}-{mode}-fp32")))
        identity = json.loads((api_dir / "run.json").read_text())["identity"]
        assert identity["endpoint"]["url"] == server.url and identity["endpoint"]["model"] == "tiny-qwen-256"
        assert identity["endpoint"]["served"]["choice"].startswith("logprobs (top 20")
        assert identity["model"] is None and identity["backend"] == "api"
    assert not [p for p in (tmp_path / "api").rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]


@pytest.mark.slow
def test_a_killed_run_resumes_to_identical_files(trained, data_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QWEN_EVAL_TEST_KEY", KEY)
    argv = ["--task", "gsm8k", "--data-dir", str(data_root), "--no-progress"]  # 3 documents
    with OpenAIServer(trained, Behaviour(key=KEY, hang_after=3)) as server:  # the probe, then two documents
        flags = [*api_flags(server.url)[:-1], "1"]  # one request at a time: the third document hangs
        killed = subprocess.Popen([sys.executable, "-m", "eval.runner", *argv, *flags, "--output-dir",
                                   str(tmp_path / "resumed")], cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL,
                                  env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"})
        samples = tmp_path / "resumed"
        deadline = time.time() + 300
        while server.answered < 3 or len(list(samples.rglob("samples.jsonl"))) < 1 or \
                len(next(samples.rglob("samples.jsonl")).read_text().splitlines()) < 2:
            assert time.time() < deadline and killed.poll() is None
            time.sleep(0.2)
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        server.behaviour.hang_after = None
        assert runner.main([*argv, *flags, "--output-dir", str(tmp_path / "resumed")]) == 0
        assert "resuming, 2 of 3 documents already done" in capsys.readouterr().out
        assert runner.main([*argv, *flags, "--output-dir", str(tmp_path / "whole")]) == 0
    resumed, whole = (find_run(tmp_path / name, "gsm8k-fewshot-api") for name in ("resumed", "whole"))
    for name in ("samples.jsonl", "table.md", "run.json"):
        assert (resumed / name).read_bytes() == (whole / name).read_bytes(), name
