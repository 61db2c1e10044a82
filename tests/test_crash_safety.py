"""Runs that are killed, interrupted or fed bad input lose nothing and never mix configurations."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from eval.api import UserError
from eval.results import Record, append_lines, read_samples
from eval.runner import main
from eval.run_layout import model_folder
from fixtures import find_run, wait_for_lines, write_gsm8k, write_mmlu

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def big_data(tmp_path_factory):
    """Two MMLU subjects of 150 questions: long enough to be killed half way."""
    root = tmp_path_factory.mktemp("mmlu150")
    write_mmlu(root, rows_per_subject=150)
    return root


def cli_args(checkpoint, data, out, *extra):
    return ["--task", "mmlu", "--model", str(checkpoint), "--data-dir", str(data), "--subjects", "anatomy,astronomy",
            "--output-dir", str(out), "--no-progress", "--batch-size", "1", *map(str, extra)]


def start(args):
    return subprocess.Popen([sys.executable, str(REPO / "eval" / "runner.py"), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, big_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    assert main(cli_args(tiny_checkpoint, big_data, out)) == 0
    run_dir = find_run(out, "mmlu-fewshot-fp32")
    return (run_dir / "table.md").read_text(), (run_dir / "samples.jsonl").read_text()


@pytest.mark.parametrize("kill_after", [1, 60, 200])
@pytest.mark.parametrize("tear", [False, True])
def test_sigkill_then_resume_equals_an_uninterrupted_run(kill_after, tear, tiny_checkpoint, big_data, reference, tmp_path):
    args = cli_args(tiny_checkpoint, big_data, tmp_path)
    samples = tmp_path / model_folder(str(tiny_checkpoint)) / "mmlu-fewshot-fp32" / "samples.jsonl"
    proc = start(args)
    wait_for_lines(samples, kill_after, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if tear:  # the state a kill in the middle of a write leaves: half a line at the end
        data = samples.read_bytes()
        samples.write_bytes(data + data.splitlines(keepends=True)[-1][:37])
    with pytest.warns(UserWarning, match="torn last line") if tear else _no_warning():
        assert main(args) == 0
    run_dir = find_run(tmp_path, "mmlu-fewshot-fp32")
    assert ((run_dir / "table.md").read_text(), samples.read_text()) == reference


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_sigint_writes_a_partial_table_then_resume_completes(tiny_checkpoint, big_data, reference, tmp_path):
    args = cli_args(tiny_checkpoint, big_data, tmp_path)
    run_dir = tmp_path / model_folder(str(tiny_checkpoint)) / "mmlu-fewshot-fp32"
    proc = start(args)
    wait_for_lines(run_dir / "samples.jsonl", 30, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    results = json.loads((run_dir / "results.json").read_text())
    assert results["partial"] and 30 <= results["n_done"] < 300
    assert "PARTIAL" in (run_dir / "table.md").read_text()
    assert main(args) == 0
    assert ((run_dir / "table.md").read_text(), (run_dir / "samples.jsonl").read_text()) == reference


def record(doc_id: str) -> Record:
    return Record(doc_id, "", "", 0, False, {}, [], {})


def test_a_record_line_is_kept_until_its_scores_are_replaced():
    """A run writes each record twice (as it finishes, in canonical order at the end): the line is encoded
    once, and a re-score (a new scores dict) gives the new scores under a valid checksum."""
    record = Record("d1", "s", "h", 3, False, {"q": 1}, [{"kind": "Choice"}], {"correct": True})
    first = record.line()
    assert record.line() is first
    record.scores = {"correct": False}
    again = json.loads(record.line())
    assert again["correct"] is False
    assert Record.parse(again, "samples.jsonl").scores == {"correct": False}


def test_torn_last_line_is_dropped_with_a_warning(tmp_path):
    samples = tmp_path / "samples.jsonl"
    append_lines(samples, [record("a"), record("b")])
    with open(samples, "ab") as f:
        f.write(b'{"doc_id": "c", "tru')
    with pytest.warns(UserWarning, match="dropped a torn last line"):
        assert list(read_samples(samples, repair=True).records) == ["a", "b"]
    append_lines(samples, [record("c")])
    assert list(read_samples(samples).records) == ["a", "b", "c"]


def test_corrupt_middle_line_is_an_error(tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text(record("a").line() + "not json\n" + record("b").line())
    with pytest.raises(UserError, match="samples.jsonl:2: corrupt record"):
        read_samples(samples)


def test_batch_sizes_give_identical_samples(tiny_checkpoint, data_root, tmp_path):
    files = []
    for batch in (1, 3, 8):
        for mode, limit in (("fewshot", "7"), ("chat", "2")):
            out = tmp_path / f"b{batch}"
            assert main(["--task", "cmmlu", "--mode", mode, "--model", str(tiny_checkpoint), "--data-dir", str(data_root),
                         "--subjects", "agronomy,arts", "--limit", limit, "--output-dir", str(out), "--no-progress",
                         "--batch-size", str(batch)]) == 0
        files.append([(find_run(out, f"cmmlu-{m}-fp32") / "samples.jsonl").read_text() for m in ("fewshot", "chat")])
    assert files[0] == files[1] == files[2]


def test_different_configuration_is_refused(tiny_checkpoint, data_root, tmp_path, capsys):
    args = ["--task", "mmlu", "--model", str(tiny_checkpoint), "--data-dir", str(data_root), "--subjects", "anatomy",
            "--limit", "2", "--output-dir", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    assert main(args + ["--verbatim-csv"]) == 2
    assert "holds a run with a different configuration (options differ)" in capsys.readouterr().err
    assert main(args + ["--verbatim-csv", "--overwrite"]) == 0


def test_same_shaped_checkpoint_with_other_weights_is_another_model(tiny_checkpoint, data_root, tmp_path, capsys):
    import shutil

    from checkpoints import tiny_model, write_checkpoint

    other = write_checkpoint(tiny_model(seed=6, dim=32, n_head=2, intermediate_size=48), tmp_path / "b" / "tiny", "v1.1")
    args = ["--task", "mmlu", "--data-dir", str(data_root), "--subjects", "anatomy", "--limit", "1",
            "--output-dir", str(tmp_path / "out"), "--no-progress"]
    assert main(args + ["--model", str(tiny_checkpoint)]) == 0
    assert main(args + ["--model", str(other)]) == 0  # .../tiny and .../b/tiny: two model folders, never mixed
    assert len(list((tmp_path / "out").glob("tiny-*/mmlu-fewshot-fp32/samples.jsonl"))) == 2
    retrained = shutil.copytree(tiny_checkpoint, tmp_path / "c" / "tiny")
    assert main(args + ["--model", str(retrained)]) == 0
    for shard in other.glob("*.safetensors"):  # new weights written over the same path
        shutil.copy(shard, retrained / shard.name)
    assert main(args + ["--model", str(retrained)]) == 2
    assert "(model differ)" in capsys.readouterr().err
    shutil.rmtree(other)


BAD_INPUT = [
    (["--task", "mmlux"], "unknown task 'mmlux'; did you mean 'mmlu'?"),
    (["--task", "mmlu", "--model", "/no/such/model"], "model path '/no/such/model' does not exist"),
    (["--task", "mmlu", "--data-dir", "{empty}"], "mmlu/dev/anatomy_dev.csv not found"),
    (["--task", "mmlu", "--output-dir", "{file}/sub"], "is a file, not a folder"),
    (["--task", "mmlu", "--subjects", "anatomyy"], "unknown mmlu subject 'anatomyy'; did you mean 'anatomy'?"),
    (["--task", "gsm8k", "--data-dir", "{badjson}"], "test.jsonl:2: not valid JSON"),
    (["--task", "mmlu", "--data-dir", "{badcsv}"], "anatomy_test.csv: malformed CSV (Error tokenizing data. C error: "
                                                   "Expected 6 fields in line 8, saw 8)"),
    (["--task", "mmlu", "--lengths", "1,x"], "--lengths '1,x': expected comma-separated integers"),
    (["--task", "humaneval"], "--allow-code-execution"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUT)
def test_bad_input_exits_2_with_a_message_naming_it(argv, message, tiny_checkpoint, data_root, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("")
    badjson = tmp_path / "badjson"
    write_gsm8k(badjson)
    lines = (badjson / "gsm8k" / "test.jsonl").read_text().splitlines()
    (badjson / "gsm8k" / "test.jsonl").write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    badcsv = tmp_path / "badcsv"
    write_mmlu(badcsv, subjects=("anatomy",))
    with open(badcsv / "mmlu" / "test" / "anatomy_test.csv", "a") as f:
        f.write("q,a,b,c,d,A,extra,more\n")
    paths = {"empty": tmp_path / "empty", "file": tmp_path / "file", "badjson": badjson, "badcsv": badcsv}
    argv = [a.format(**paths) for a in argv]
    defaults = {"--model": str(tiny_checkpoint), "--data-dir": str(data_root), "--output-dir": str(tmp_path / "out"),
                "--subjects": "anatomy"}
    for flag, value in defaults.items():
        if flag not in argv and not (flag == "--subjects" and ("gsm8k" in argv or "humaneval" in argv)):
            argv += [flag, value]
    assert main(argv + ["--no-progress", "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_flag_value_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--task", "mmlu", "--mode", "zero-shot"])
    assert exit_info.value.code == 2
    assert "argument --mode: invalid choice: 'zero-shot'" in capsys.readouterr().err
