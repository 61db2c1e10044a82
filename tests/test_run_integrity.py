"""Fault injection: a run directory never holds numbers from another model, scorer or writer (issue 17).

Kills at each rename and append, corrupted and edited records, two writers, weights and scorers swapped
between invocations, a smaller selection, a missing run.json, a full disk and a terminal that cannot
show the table: each ends in byte-identical files after resuming, or in one line and exit code 2.
"""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eval.api import LoglikelihoodResponse, stable_hash
from eval.data import DataSource
from eval.pipeline import execute, plan_task
from eval.run_layout import model_folder
from eval.runner import main
from eval.tasks import long_ppl, mmlu
from fixtures import find_run, write_mmlu

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def mmlu_args(checkpoint, data, out, *extra):
    return ["--task", "mmlu", "--model", str(checkpoint), "--data-dir", str(data), "--subjects", "anatomy,astronomy",
            "--output-dir", str(out), "--no-progress", *map(str, extra)]


def run_dir(out: Path) -> Path:
    """The MMLU run (its model folder's name carries a hash of the checkpoint's path)."""
    return find_run(out, "mmlu-fewshot-fp32")


def lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir(out) / "samples.jsonl").read_text().splitlines()]


def write_lines(out: Path, records: list[dict]) -> None:
    (run_dir(out) / "samples.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def resealed(record: dict) -> dict:
    """A record with a valid checksum for its (changed) content: what an older scorer or writer left."""
    body = {k: v for k, v in record.items() if k != "checksum"}
    return {**body, "checksum": stable_hash(body)}


def files(out: Path) -> tuple[str, str]:
    return (run_dir(out) / "samples.jsonl").read_text(), (run_dir(out) / "table.md").read_text()


def one_line_error(capsys, *fragments) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    assert main(mmlu_args(tiny_checkpoint, data_root, out, "--limit", 4)) == 0
    return files(out)


# ---- identity: everything that determines the numbers ----------------------------------------------------
def test_changed_decoder_layer_weights_are_another_model(tiny_checkpoint, data_root, tmp_path, capsys):
    """A fine-tune changes the layers between the embedding and the LM head: the fingerprint sees every byte.

    One safetensors file stores its tensors by name: lm_head (MiBs), the decoder layers, then the embedding."""
    from safetensors.torch import load_file, save_file

    tensors = {}
    for path in tiny_checkpoint.glob("*.safetensors"):
        tensors.update(load_file(path))
    ckpt = tmp_path / "tiny"  # tuned in place: the same path, so the same run directory
    ckpt.mkdir(parents=True)
    for path in ("config.json", "qwen.tiktoken"):
        (ckpt / path).write_bytes((tiny_checkpoint / path).read_bytes())
    out = tmp_path / "out"
    for delta, limit in ((0.0, 1), (0.01, 2)):
        save_file({n: t + delta if ".h.0." in n else t for n, t in tensors.items()}, ckpt / "model.safetensors",
                  metadata={"format": "pt"})
        code = main(mmlu_args(ckpt, data_root, out, "--limit", limit))
        if not delta:
            assert code == 0
            capsys.readouterr()
    assert code == 2
    one_line_error(capsys, "(model differ)")


def test_weights_fingerprint_is_of_the_stored_bytes(tiny_checkpoint):
    from model import load_model

    base = load_model(tiny_checkpoint, dtype="fp32", device="cpu").weights_fingerprint
    assert base == load_model(tiny_checkpoint, dtype="bf16", device="cpu").weights_fingerprint  # bytes as stored
    assert len(base) == 32


def test_each_task_carries_only_its_own_data_and_subjects_are_a_selection(tiny_checkpoint, data_root, tmp_path):
    args = ["--model", str(tiny_checkpoint), "--data-dir", str(data_root), "--output-dir", str(tmp_path),
            "--no-progress", "--limit", "1"]
    assert main(["--task", "long_ppl,gsm8k", "--lengths", "32,64", *args]) == 0
    gsm8k = json.loads((find_run(tmp_path, "gsm8k-fewshot-fp32") / "run.json").read_text())["identity"]
    assert gsm8k["data"] and all(name.startswith("gsm8k") for name in gsm8k["data"]), gsm8k["data"]
    assert main(["--task", "gsm8k", *args]) == 0
    assert main(["--task", "mmlu", "--subjects", "anatomy", *args]) == 0
    assert main(["--task", "mmlu", "--subjects", "astronomy", *args]) == 0  # another selection, not other data
    saved = [json.loads(x)["doc_id"] for x in (run_dir(tmp_path) / "samples.jsonl").open()]
    assert sorted(saved) == ["mmlu/anatomy/0", "mmlu/astronomy/0"]


# ---- scores are derived, never trusted -----------------------------------------------------------------
def test_scores_are_rederived_from_the_raw_responses(tiny_checkpoint, data_root, reference, tmp_path):
    """Stored scores from an older scorer (checksum valid) never reach the table: resuming recomputes them."""
    args = mmlu_args(tiny_checkpoint, data_root, tmp_path)
    assert main(args + ["--limit", "2"]) == 0
    write_lines(tmp_path, [resealed({**r, "correct": not r["correct"], "pred": "Z"}) for r in lines(tmp_path)])
    assert main(args + ["--limit", "4"]) == 0
    assert files(tmp_path) == reference


def test_a_changed_scorer_scores_every_record(tiny_checkpoint, data_root, tmp_path, monkeypatch):
    """Never a mix: after the scorer changes, the resumed table is the new scorer's on every document."""
    args = mmlu_args(tiny_checkpoint, data_root, tmp_path)
    assert main(args + ["--limit", "2"]) == 0
    score = mmlu.MMLU.score
    monkeypatch.setattr(mmlu.MMLU, "score", lambda *a: {**score(*a), "correct": True})
    assert main(args + ["--limit", "4"]) == 0
    results = json.loads((run_dir(tmp_path) / "results.json").read_text())
    assert results["metrics"]["acc"] == 100.0 and all(r["correct"] for r in lines(tmp_path))


def test_an_edited_record_is_detected(tiny_checkpoint, data_root, tmp_path, capsys):
    args = mmlu_args(tiny_checkpoint, data_root, tmp_path, "--limit", 2)
    assert main(args) == 0
    records = lines(tmp_path)
    records[1]["responses"][0]["logits"][0] += 1.0
    write_lines(tmp_path, records)
    capsys.readouterr()
    assert main(args) == 2
    one_line_error(capsys, f"samples.jsonl:2: the record of {records[1]['doc_id']} was changed", "checksum")


def test_conflicting_duplicate_records_name_the_document(tiny_checkpoint, data_root, tmp_path, capsys):
    args = mmlu_args(tiny_checkpoint, data_root, tmp_path, "--limit", 2)
    assert main(args) == 0
    records = lines(tmp_path)
    other = json.loads(json.dumps(records[0]))
    other["responses"][0]["logits"] = list(reversed(other["responses"][0]["logits"]))
    write_lines(tmp_path, records + [resealed(other)])
    capsys.readouterr()
    assert main(args) == 2
    one_line_error(capsys, f"a second, different record of {records[0]['doc_id']}")


# ---- one writer per directory ----------------------------------------------------------------------------
def test_a_second_writer_is_refused_with_the_holders_pid(tiny_checkpoint, data_root, reference, tmp_path, capsys):
    args = mmlu_args(tiny_checkpoint, data_root, tmp_path, "--limit", 4)
    assert main(args) == 0
    before = files(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); f.truncate(0); f.write('4242\\n'); f.flush(); "
                               "print('held', flush=True); time.sleep(60)", str(run_dir(tmp_path) / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        capsys.readouterr()
        for argv in (args, args + ["--overwrite"], ["rescore", str(run_dir(tmp_path))]):  # none races a live writer
            assert main(argv) == 2
            one_line_error(capsys, "is being written by another process (pid 4242)")
    finally:
        holder.kill()
        holder.wait()
    assert files(tmp_path) == before == reference


def test_two_racing_writers_leave_one_run(tiny_checkpoint, tmp_path_factory, tmp_path):
    data = tmp_path_factory.mktemp("mmlu150")
    write_mmlu(data, rows_per_subject=150)
    args = mmlu_args(tiny_checkpoint, data, tmp_path, "--batch-size", 1)
    first = subprocess.Popen([sys.executable, str(REPO / "eval" / "runner.py"), *args], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples = tmp_path / model_folder(str(tiny_checkpoint)) / "mmlu-fewshot-fp32" / "samples.jsonl"
    deadline = time.time() + 120
    while not (samples.exists() and samples.read_bytes().count(b"\n")) and time.time() < deadline:
        assert first.poll() is None, first.communicate()
        time.sleep(0.01)
    os.kill(first.pid, signal.SIGSTOP)  # the first writer stays mid-run (holding its lock) however fast the machine
    try:
        assert first.poll() is None, "the first writer finished before the race"
        second = subprocess.run([sys.executable, str(REPO / "eval" / "runner.py"), *args, "--verbatim-csv",
                                 "--overwrite"], cwd=REPO, capture_output=True, text=True)  # same directory
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2 and "is being written by another process" in second.stderr, second.stderr
    assert f"pid {first.pid}" in second.stderr or str(first.pid) in second.stderr
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    results = json.loads((run_dir(tmp_path) / "results.json").read_text())
    assert results["identity"]["dtype"] == "torch.float32" and results["n_done"] == 300
    assert not [p for p in run_dir(tmp_path).iterdir() if p.name.endswith(".tmp")]


# ---- kills at each rename and append ----------------------------------------------------------------------
class Killed(BaseException):
    """A process death at a chosen point: nothing in the harness may catch it."""


@pytest.mark.parametrize("point", ["append", "before-rename", "after-rename"])
def test_a_kill_at_each_write_point_resumes_to_identical_files(point, tiny_checkpoint, data_root, reference,
                                                                tmp_path, monkeypatch):
    args = mmlu_args(tiny_checkpoint, data_root, tmp_path, "--limit", 4, "--batch-size", 1)
    name = "fsync" if point == "append" else "replace"
    real = getattr(os, name)
    for kill_at in range(1, 40):
        calls = {"n": 0}

        def dying(*a, real=real, kill_at=kill_at):
            calls["n"] += 1
            if calls["n"] == kill_at and point == "before-rename":
                raise Killed
            result = real(*a)
            if calls["n"] == kill_at:
                raise Killed
            return result

        monkeypatch.setattr(os, name, dying)
        try:
            main(args)
            done = True
        except Killed:
            done = False
        monkeypatch.setattr(os, name, real)
        assert main(args) == 0
        assert files(tmp_path) == reference, (point, kill_at)
        if done:
            break
        (run_dir(tmp_path) / "results.json").unlink(missing_ok=True)
    assert kill_at > 3  # several points were hit


# ---- selections, rescoring, lost files ---------------------------------------------------------------------
def test_a_smaller_limit_keeps_every_saved_record(tiny_checkpoint, data_root, reference, tmp_path):
    args = mmlu_args(tiny_checkpoint, data_root, tmp_path)
    assert main(args + ["--limit", "4"]) == 0
    assert main(args + ["--limit", "1"]) == 0
    assert len(lines(tmp_path)) == 8
    assert json.loads((run_dir(tmp_path) / "results.json").read_text())["n_docs"] == 8  # the larger table is kept
    assert main(args + ["--limit", "4"]) == 0
    assert files(tmp_path) == reference


def test_rescore_of_an_unfinished_run_stays_partial_and_keeps_the_provenance(tiny_checkpoint, data_root, tmp_path):
    assert main(mmlu_args(tiny_checkpoint, data_root, tmp_path, "--limit", 4)) == 0
    original = json.loads((run_dir(tmp_path) / "results.json").read_text())
    assert main(["rescore", str(run_dir(tmp_path))]) == 0
    rescored = json.loads((run_dir(tmp_path) / "results.json").read_text())
    assert rescored["provenance"]["argv"] == original["provenance"]["argv"]
    assert rescored["provenance"]["data"] == original["provenance"]["data"] and "rescored" in rescored["provenance"]
    samples = run_dir(tmp_path) / "samples.jsonl"
    samples.write_text("".join(samples.read_text().splitlines(keepends=True)[:3]))  # as a killed run leaves it
    (run_dir(tmp_path) / "results.json").unlink()
    assert main(["--rescore", str(run_dir(tmp_path))]) == 0
    results = json.loads((run_dir(tmp_path) / "results.json").read_text())
    assert results["partial"] and (results["n_done"], results["n_docs"]) == (3, 8)
    assert "PARTIAL: 3 of 8 documents" in (run_dir(tmp_path) / "table.md").read_text()


@pytest.mark.parametrize("damage", ["deleted", "not a run.json"])
def test_a_lost_run_json_never_discards_records(damage, tiny_checkpoint, data_root, tmp_path, capsys):
    args = mmlu_args(tiny_checkpoint, data_root, tmp_path, "--limit", 2)
    assert main(args) == 0
    before = (run_dir(tmp_path) / "samples.jsonl").read_text()
    if damage == "deleted":
        (run_dir(tmp_path) / "run.json").unlink()
    else:
        (run_dir(tmp_path) / "run.json").write_text("[]")
    capsys.readouterr()
    assert main(args) == 2
    one_line_error(capsys, "run.json")
    assert (run_dir(tmp_path) / "samples.jsonl").read_text() == before


def test_a_line_that_is_no_record_is_a_one_line_error(tiny_checkpoint, data_root, tmp_path, capsys):
    args = mmlu_args(tiny_checkpoint, data_root, tmp_path, "--limit", 2)
    assert main(args) == 0
    with open(run_dir(tmp_path) / "samples.jsonl", "a") as f:
        f.write("[1, 2]\n")
    capsys.readouterr()
    assert main(args) == 2
    one_line_error(capsys, "samples.jsonl:5: not a record")


def test_a_full_disk_is_a_one_line_error(tiny_checkpoint, data_root, tmp_path, monkeypatch, capsys):
    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    assert main(mmlu_args(tiny_checkpoint, data_root, tmp_path, "--limit", 2)) == 2
    one_line_error(capsys, "No space left on device")


def test_a_terminal_that_cannot_show_the_table_never_stops_the_next_task(tiny_checkpoint, data_root, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO(), encoding="ascii"))
    assert main(["--task", "gsm8k,long_ppl", "--lengths", "32,64", "--model", str(tiny_checkpoint), "--data-dir",
                 str(data_root), "--limit", 1, "--output-dir", str(tmp_path), "--no-progress"]) == 0  # "—" in a title
    assert (find_run(tmp_path, "long_ppl-fewshot-fp32") / "results.json").exists()


def test_seconds_accumulate_and_timings_say_where_they_went(tiny_checkpoint, data_root, tmp_path):
    args = mmlu_args(tiny_checkpoint, data_root, tmp_path)
    assert main(args + ["--limit", "1"]) == 0
    first = json.loads((run_dir(tmp_path) / "results.json").read_text())
    assert main(args + ["--limit", "3"]) == 0
    second = json.loads((run_dir(tmp_path) / "results.json").read_text())
    assert set(second["timings"]) == {"load", "plan", "warmup", "serve", "score", "write"}
    assert second["seconds"] == pytest.approx(sum(second["timings"].values()), abs=0.05)  # every invocation's
    assert second["timings"]["plan"] > first["timings"]["plan"]


# ---- long_ppl: every row saved as it is computed ---------------------------------------------------------------
class CountingLoglikelihood:
    """Answers loglikelihood requests one at a time; stops (as a kill would) after `stop_after` of them."""

    name = "counting"
    choice = generate = None  # never asked: long_ppl has loglikelihood requests only

    def __init__(self, stop_after=None):
        self.stop_after, self.served = stop_after, 0

    def loglikelihood(self, requests, on_done=None):
        out = []
        for i, r in enumerate(requests):
            if self.served == self.stop_after:
                raise KeyboardInterrupt
            out.append(LoglikelihoodResponse(float(len(r.tokens)), len(r.tokens) - 1))
            self.served += 1
            on_done([(i, out[-1])])
        return out


def test_long_ppl_keeps_every_row_served_before_a_kill(tiny_checkpoint, data_root, tmp_path):
    from model import load_tokenizer

    tok = load_tokenizer(tiny_checkpoint)

    def plan():
        p = plan_task(long_ppl.TASK, "fewshot", DataSource(data_root), tok, options={"lengths": [32, 64]},
                      limit=2, run_dir=tmp_path / "run")
        p.identity = {"task": "long_ppl"}
        return p

    total = sum(map(len, plan().requests))
    with pytest.raises(KeyboardInterrupt):
        execute(plan(), CountingLoglikelihood(stop_after=3), config={}, log=lambda *_: None)
    rest = CountingLoglikelihood()
    results = execute(plan(), rest, config={}, log=lambda *_: None)
    assert rest.served == total - 3 and not results.partial
