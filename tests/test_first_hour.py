"""The first hour of a new user (issue 20), at the command line on the tiny checkpoint: mistakes are one
line naming the flag, file or row, exit 2, before any weight loads; the terminal says what happens."""
import json
import shutil

import pytest

import model
from eval.api import stable_hash
from eval.runner import main


def run_cli(*argv):
    return main([str(a) for a in argv])


@pytest.fixture
def no_weights(monkeypatch):
    """Fails the test if the runner reads any weights (every check must come first)."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the command line was checked")

    monkeypatch.setattr(model, "load_model", refuse)


@pytest.fixture
def base(tiny_checkpoint, data_root, tmp_path):
    """The flags of a small MMLU run of the tiny checkpoint."""
    return ["--task", "mmlu", "--model", tiny_checkpoint, "--data-dir", data_root, "--subjects", "anatomy",
            "--output-dir", tmp_path / "out", "--no-progress"]


def replaced(argv, flag, value):
    """argv with flag's value replaced (or the flag appended)."""
    if flag not in argv:
        return [*argv, flag, value]
    i = argv.index(flag)
    return [*argv[:i + 1], value, *argv[i + 2:]]


def error_of(capsys, *argv) -> str:
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err.removeprefix("error: ").strip()


def only_run_dir(out, prefix):
    """The one run directory under out/<model folder>/ whose name starts with prefix."""
    found = [p for p in out.glob(f"*/{prefix}*") if p.is_dir()]
    assert len(found) == 1, found
    return found[0]


# ---- flags checked before any weight loads -------------------------------------------------------------
@pytest.mark.parametrize("flags,message", [
    (["--limit", "0"], "--limit 0: expected a positive integer"),
    (["--limit", "-1"], "--limit -1: expected a positive integer"),
    (["--batch-size", "0"], "--batch-size 0: expected a positive integer"),
    (["--batch-size", "-3"], "--batch-size -3: expected a positive integer"),
    (["--device", "tpu"], "--device tpu: expected auto, cpu, cuda or cuda:N"),
    (["--device", "cuda:999"], "--device cuda:999: "),
    (["--window-attn", "0"], "--window-attn 0: window sizes and layer counts must be at least 1"),
    (["--subjects", "anatomyy"], "--subjects: unknown mmlu subject 'anatomyy'; did you mean 'anatomy'?"),
    (["--output-dir", "{file}/sub"], "--output-dir {file}/sub: {file} is a file, not a folder"),
])
def test_bad_flags_are_one_line_before_any_weight(flags, message, base, tmp_path, capsys, no_weights):
    (tmp_path / "file").write_text("")
    flag, value = flags[0], flags[1].format(file=tmp_path / "file")
    assert error_of(capsys, *replaced(base, flag, value)).startswith(message.format(file=tmp_path / "file"))


def test_lengths_past_the_data_name_the_flag(tiny_checkpoint, data_root, tmp_path, capsys, no_weights):
    err = error_of(capsys, "--task", "long_ppl", "--model", tiny_checkpoint, "--data-dir", data_root,
                   "--lengths", "32,10000000", "--output-dir", tmp_path)
    assert err.startswith("--lengths 10000000: longer than every long_ppl document")


def test_dry_run_into_an_unwritable_folder(tiny_checkpoint, data_root, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    err = error_of(capsys, "--task", "gsm8k", "--tokenizer", tiny_checkpoint / "qwen.tiktoken", "--data-dir",
                   data_root, "--dry-run", "--output-dir", tmp_path / "file" / "out")
    assert err.startswith(f"--output-dir {tmp_path / 'file' / 'out'}: ")


def test_a_configuration_clash_is_found_before_the_weights_load(base, capsys, monkeypatch):
    assert run_cli(*base, "--limit", 1) == 0
    monkeypatch.setattr(model, "load_model", lambda *a, **k: pytest.fail("weights loaded before the clash check"))
    err = error_of(capsys, *base, "--limit", 1, "--verbatim-csv")
    assert "holds a run with a different configuration (options differ)" in err


# ---- checkpoints and data ---------------------------------------------------------------------------------
def test_corrupt_safetensors_header_names_the_file(tiny_checkpoint, base, tmp_path, capsys):
    broken = shutil.copytree(tiny_checkpoint, tmp_path / "broken")
    shard = broken / "model-00001-of-00002.safetensors"
    shard.write_bytes(b"\xff" * 8 + shard.read_bytes()[8:])
    assert error_of(capsys, *replaced(base, "--model", broken)).startswith(f"{shard}: corrupt safetensors header length")


def test_a_missing_relative_path_is_not_a_hub_id(base, tmp_path, capsys, monkeypatch, no_weights):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scratch").mkdir()
    assert error_of(capsys, *replaced(base, "--model", "scratch/nonexist")) == "model path 'scratch/nonexist' does not exist"


def test_checkpoint_errors_are_not_called_tokenizer_errors(base, tmp_path, capsys, no_weights):
    (tmp_path / "empty").mkdir()
    err = error_of(capsys, *replaced(base, "--model", tmp_path / "empty"))
    assert not err.startswith("tokenizer:") and str(tmp_path / "empty") in err


def test_offline_hub_id_says_what_a_local_folder_needs(data_root, tmp_path, capsys, monkeypatch, no_weights):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = error_of(capsys, "--task", "gsm8k", "--data-dir", data_root, "--output-dir", tmp_path)
    assert "could not fetch 'Qwen/Qwen-7B'" in err
    assert all(word in err for word in ("config.json", "qwen.tiktoken", "model.safetensors", "tiny-qwen-256"))


def test_csv_rows_are_named_by_file_line(base, data_root, tmp_path, capsys, no_weights):
    data = shutil.copytree(data_root, tmp_path / "data")
    path = data / "mmlu" / "test" / "anatomy_test.csv"
    lines = path.read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ",E"
    path.write_text("\n".join(lines) + "\n")
    assert error_of(capsys, *replaced(base, "--data-dir", data)).startswith(f"line 3 of {path}: answer 'E' is not one of A, B, C, D")


def test_gsm8k_rescore_scores_non_ascii_digits_invalid(tiny_checkpoint, data_root, tmp_path):
    assert run_cli("--task", "gsm8k", "--model", tiny_checkpoint, "--data-dir", data_root, "--limit", 1,
                   "--output-dir", tmp_path, "--no-progress") == 0
    run_dir = only_run_dir(tmp_path, "gsm8k-fewshot")
    record = json.loads((run_dir / "samples.jsonl").read_text())
    record.pop("checksum")
    record["responses"][0]["text"] = "The answer is \uff17"  # fullwidth 7: the gold, but eval() rejects it
    (run_dir / "samples.jsonl").write_text(json.dumps({**record, "checksum": stable_hash(record)}) + "\n")
    assert run_cli("--rescore", run_dir) == 0
    metrics = json.loads((run_dir / "results.json").read_text())["metrics"]
    assert metrics["acc"] == 0.0 and metrics["invalid"] == 1


def test_cuda_without_cuda_is_one_line(base, capsys, monkeypatch, no_weights):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = error_of(capsys, *base, "--device", "cuda")
    assert err.startswith("--device cuda: no CUDA device available") and err.endswith("use --device cpu")


# ---- what the terminal shows --------------------------------------------------------------------------------
def test_loading_line_named_bars_summary_stderr_and_where_results_went(tiny_checkpoint, data_root, tmp_path, capsys):
    assert run_cli("--task", "mmlu", "--model", tiny_checkpoint, "--data-dir", data_root, "--subjects", "anatomy",
                   "--limit", 4, "--output-dir", tmp_path, "--device", "cpu") == 0  # progress bars on
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert f"loading {tiny_checkpoint} (fp32, cpu) ..." in lines and any(x.startswith("loaded ") for x in lines)
    assert "mmlu (fewshot) choice" in err  # the bar says which task it is serving
    run_dir = only_run_dir(tmp_path, "mmlu-fewshot")
    summary = [x for x in lines if x.startswith("mmlu (fewshot): acc ")]
    assert summary and summary[0].endswith(f"on 4 documents -> {run_dir}") and " ± " in summary[0]
    assert lines[-1] == f"results written to {run_dir.parent}/ (mmlu-fewshot-fp32)"
    table = (run_dir / "table.md").read_text()
    assert "| name | n | acc | stderr | acc_parity |" in table and "| name | n | acc | stderr |" in out


def test_skipped_rows_are_on_the_terminal_and_in_the_table(base, data_root, tmp_path, capsys):
    data = shutil.copytree(data_root, tmp_path / "data")
    path = data / "mmlu" / "test" / "anatomy_test.csv"
    lines = path.read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ",E"
    path.write_text("\n".join(lines) + "\n")
    assert run_cli(*replaced(base, "--data-dir", data), "--skip-bad-rows") == 0
    out = capsys.readouterr().out
    assert "; 1 bad data rows skipped (listed in table.md)" in out
    table = (only_run_dir(tmp_path / "out", "mmlu-fewshot") / "table.md").read_text()
    assert f"1 bad data row(s) skipped (--skip-bad-rows):\n- line 3 of {path}: answer 'E'" in table


# ---- run folders that do not collide ----------------------------------------------------------------------
def test_run_folders_carry_dtype_switches_and_the_checkpoint_path(tiny_checkpoint, base, tmp_path):
    for parent in ("a", "b"):
        shutil.copytree(tiny_checkpoint, tmp_path / parent / "step-final")
        assert run_cli(*replaced(base, "--model", tmp_path / parent / "step-final"), "--limit", 1) == 0
    folders = sorted(p.parent.name for p in (tmp_path / "out").glob("step-final-*/mmlu-fewshot-fp32"))
    assert len(folders) == 2  # /a/step-final and /b/step-final kept apart
    for window in ("auto", "none"):
        assert run_cli(*base, "--limit", 1, "--window-attn", window) == 0
    assert only_run_dir(tmp_path / "out", "mmlu-fewshot-win_auto-fp32") != only_run_dir(tmp_path / "out",
                                                                                        "mmlu-fewshot-win_none-fp32")
    assert run_cli(*base, "--limit", 1, "--dtype", "bf16") == 0
    assert only_run_dir(tmp_path / "out", "mmlu-fewshot-bf16").parent == only_run_dir(tmp_path / "out",
                                                                                      "mmlu-fewshot-win_auto").parent


def test_dry_run_with_only_a_tokenizer_is_filed_by_tokenizer_and_never_overwritten(tiny_checkpoint, data_root,
                                                                                   tmp_path, capsys):
    argv = ["--task", "gsm8k", "--tokenizer", tiny_checkpoint / "qwen.tiktoken", "--data-dir", data_root,
            "--dry-run", "--output-dir", tmp_path]
    assert run_cli(*argv, "--limit", 1) == 0
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == ["tokenizer"]  # not Qwen-7B/
    requests = only_run_dir(tmp_path, "gsm8k-fewshot") / "requests.jsonl"
    first = requests.read_text()
    assert run_cli(*argv, "--limit", 1) == 0 and requests.read_text() == first  # the same dry run again
    err = error_of(capsys, *argv, "--limit", 2)
    assert err == f"{requests} holds the requests of another dry run; use another --output-dir, or --overwrite to replace it"
    assert requests.read_text() == first
    assert run_cli(*argv, "--limit", 2, "--overwrite") == 0 and requests.read_text() != first


# ---- help ----------------------------------------------------------------------------------------------------
def test_help_explains_every_flag_and_names_the_subcommands(capsys):
    from eval.runner import parser

    p = parser()
    assert all(action.help for action in p._actions), [a.dest for a in p._actions if not a.help]
    with pytest.raises(SystemExit):
        main(["--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert all(command in usage for command in ("report", "compare", "rescore", "list"))


# ---- one command for the published tables -----------------------------------------------------------------------
def test_a_suite_runs_each_task_in_its_own_directory_and_ends_with_the_report(tiny_checkpoint, data_root, tmp_path,
                                                                             capsys, monkeypatch):
    from eval import suites

    # the real suites need every subject's files; this one has the same shape on the fixture data
    monkeypatch.setitem(suites.SUITES, "qwen-7b-chat", (suites.Entry("gsm8k", "fewshot"),
                        suites.Entry("gsm8k", "chat", {"ceval_chat_rules": "2023-08-03"})))
    argv = ["--task", "qwen-7b-chat", "--model", tiny_checkpoint, "--data-dir", data_root, "--limit", 1,
            "--output-dir", tmp_path, "--no-progress"]
    assert run_cli(*argv) == 0
    out = capsys.readouterr().out
    fewshot, chat = only_run_dir(tmp_path, "gsm8k-fewshot"), only_run_dir(tmp_path, "gsm8k-chat")
    flags = [json.loads((d / "results.json").read_text())["config"]["ceval_chat_rules"] for d in (fewshot, chat)]
    assert flags == ["2023-08-25", "2023-08-03"]  # a suite entry's own scoring flags
    assert "# Reproduction report" in out and "| GSM8K 0-shot | acc | 41.1 |" in out
    assert out.strip().splitlines()[-1].startswith("results written to ")
    samples = (chat / "samples.jsonl").read_text()
    assert run_cli(*argv) == 0 and (chat / "samples.jsonl").read_text() == samples  # resumable: nothing redone
