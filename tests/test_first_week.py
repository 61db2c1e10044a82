"""A user's first week (issue 25), at the command line: every option checked before the load, no flag silently
ignored, no generation lost to a scoring error, a smaller --limit never replacing a larger table, honest timings,
truncation shown, messages that say what to do, and lm-evaluation-harness spellings."""
import json
import re

import pytest

from eval import registry, runner
from eval.api import counted
from eval.run_config import RunConfig
from eval.suites import SUITES, Entry
from eval.runner import main, parse_config
from test_first_hour import base, error_of, no_weights, only_run_dir, replaced, run_cli  # noqa: F401 (fixtures)


# ---- items 1, 2, 6, 10: one line and exit 2 before any weight loads ------------------------------------------
@pytest.mark.parametrize("flags,message", [
    (["--task", "humaneval", "--timeout", "-3"], "--timeout -3: expected a number above 0"),  # 1
    (["--task", "humaneval", "--temperature", "0.5", "--allow-code-execution"],
     "--temperature applies when sampling: add --samples N"),  # 2
    (["--task", "humaneval", "--samples", "2", "--temperature", "-1", "--allow-code-execution"],
     "--temperature -1: expected a number above 0"),
    (["--temperature", "0.5"], "--temperature is an option of humaneval, which this run does not include"),  # 2, 6
    (["--lengths", "64"], "--lengths is an option of long_ppl, which this run does not include"),  # 6
    (["--task", "qwen-7b-base", "--mode", "chat"], "--mode chat: suite qwen-7b-base sets each task's mode"),  # 6
    (["--task", "MMLU"], "unknown task 'MMLU'; did you mean 'mmlu'?"),  # 10
    (["--task", "qwen7b-base"], "unknown task 'qwen7b-base'; did you mean 'qwen-7b-base'?"),  # 10
    (["--tokenizer", "/missing"], "--tokenizer /missing: no such file or folder"),  # 10
    (["--kernels", "fast", "--backend", "hf"], "--kernels applies to --backend native only"),  # 6
    (["--limit", "0.1"], "--limit 0.1: a fraction of each task is lm-evaluation-harness's"),  # lm-eval
    (["--model_args", "pretrained=x"], "--model_args is lm-evaluation-harness's: qwen-eval takes the checkpoint"),
    (["--apply_chat_template"], "--apply_chat_template is lm-evaluation-harness's"),
])
def test_mistakes_are_one_line_before_any_weight(flags, message, base, capsys, no_weights):
    argv = base
    for flag, value in zip(flags[::2], flags[1::2]):
        argv = replaced(argv, flag, value)
    if len(flags) % 2:  # a switch
        argv = [*argv, flags[-1]]
    assert error_of(capsys, *argv).startswith(message)


def test_dry_run_with_rescore_is_refused(tmp_path, capsys):  # 6
    err = error_of(capsys, "--rescore", tmp_path, "--dry-run")
    assert err.startswith(f"--rescore re-scores the saved run {tmp_path}")


def test_model_paths_that_cannot_be_a_checkpoint(tiny_checkpoint, base, tmp_path, capsys, no_weights):  # 10
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "config.json").write_text("{}")
    (packed / "model.safetensors.gz").write_bytes(b"")
    assert error_of(capsys, *replaced(base, "--model", packed)).startswith(
        f"--model {packed}: holds only model.safetensors.gz; unpack it first: gunzip -c")
    weights = next(tiny_checkpoint.glob("*.safetensors"))
    assert error_of(capsys, *replaced(base, "--model", weights)) == (
        f"--model {weights}: a file; pass the checkpoint folder that holds it and config.json ({tiny_checkpoint})")


def test_busy_and_corrupt_run_directories_are_found_before_the_load(base, tmp_path, capsys, monkeypatch):  # 10
    import model

    from eval.results import RunStore

    loaded = []
    real = model.load_model
    monkeypatch.setattr(model, "load_model", lambda *a, **k: loaded.append(1) or real(*a, **k))
    assert run_cli(*replaced(base, "--limit", "1")) == 0
    run_dir = only_run_dir(tmp_path / "out", "mmlu-fewshot")
    loaded.clear()
    store = RunStore(run_dir)
    try:
        assert "is being written by another process" in error_of(capsys, *base)
    finally:
        store.close()
    samples = run_dir / "samples.jsonl"
    samples.write_text("{oops\n" + samples.read_text())
    assert error_of(capsys, *base) == f"{samples}:1: corrupt record in the middle of the file"
    assert not loaded


# ---- item 1: a scoring error loses no generation --------------------------------------------------------------
def test_a_scoring_error_keeps_every_response(tiny_checkpoint, data_root, tmp_path, monkeypatch):
    from eval.backends import NativeBackend
    from eval.tasks import gsm8k

    argv = ["--task", "gsm8k", "--model", tiny_checkpoint, "--data-dir", data_root, "--limit", 2,
            "--output-dir", tmp_path, "--no-progress"]

    def broken(*args, **kwargs):
        raise ValueError("a scorer bug")

    with monkeypatch.context() as patch:
        patch.setattr(gsm8k.TASK, "score", broken)
        with pytest.raises(ValueError) as raised:
            run_cli(*argv)
    assert "every response is saved" in str(raised.value.__notes__)
    run_dir = only_run_dir(tmp_path, "gsm8k-fewshot")
    saved = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(saved) == 2 and all("part" in item for item in saved)
    monkeypatch.setattr(NativeBackend, "generate", lambda *a, **k: pytest.fail("generated again"))
    assert run_cli(*argv) == 0
    assert json.loads((run_dir / "results.json").read_text())["n_done"] == 2


# ---- item 2: sampling settings and --seed are part of the run ------------------------------------------------
def test_sampling_records_its_temperature_and_seed_and_greedy_neither():
    task = registry.get_task("humaneval")

    def options(argv):
        config = parse_config(["--task", "humaneval", *argv])
        return runner._run_options(task, "fewshot", runner._task_options(task, Entry("humaneval", "fewshot"),
                                                                           config), config)

    assert options([]) == {"timeout": 3.0, "execution": "separate"}
    assert options(["--seed", "7"]) == options([])  # greedy: the seed changes nothing
    sampled = options(["--samples", "2"])
    assert sampled["temperature"] == 0.8 and sampled["seed"] == 1234
    assert options(["--samples", "2", "--seed", "7"]) != sampled  # another seed: another run, not a resume
    from eval.tasks.humaneval import samplings

    seeds = lambda s: [x["seed"] for x in samplings({**sampled, "seed": s})]  # noqa: E731
    assert len(set(seeds(1234))) == 2 and not set(seeds(1234)) & set(seeds(1235))


# ---- items 4, 7, 8 and the summary file ---------------------------------------------------------------------
def test_smaller_limit_keeps_the_larger_table(base, tmp_path, capsys):  # 4
    assert run_cli(*replaced(base, "--limit", "2")) == 0
    run_dir = only_run_dir(tmp_path / "out", "mmlu-fewshot")
    files = {name: (run_dir / name).read_text() for name in ("table.md", "results.json", "samples.jsonl", "run.json")}
    capsys.readouterr()
    assert run_cli(*replaced(base, "--limit", "1")) == 0
    assert "keeps the table of its larger selection (2 documents)" in capsys.readouterr().out
    assert {name: (run_dir / name).read_text() for name in files} == files
    assert run_cli(*replaced(base, "--limit", "3")) == 0  # a larger selection does replace it
    assert json.loads((run_dir / "results.json").read_text())["n_docs"] == 3


def test_load_once_timings_add_up_config_is_the_runs_and_a_summary(tiny_checkpoint, data_root, tmp_path, capsys,
                                                                    monkeypatch):
    # two runs of one model in one invocation (the fixture data holds few subjects: gsm8k in both modes)
    monkeypatch.setitem(SUITES, "qwen-7b-chat", (Entry("gsm8k", "fewshot"), Entry("gsm8k", "chat")))
    argv = ["--task", "qwen-7b-chat", "--model", tiny_checkpoint, "--data-dir", data_root, "--limit", 2,
            "--output-dir", tmp_path, "--no-progress"]
    assert run_cli(*argv) == 0  # 7: one load, counted once
    seconds = [line for line in capsys.readouterr().out.splitlines() if ": seconds " in line]
    assert ["load" in line for line in seconds] == [True, False]
    run_dir = only_run_dir(tmp_path, "gsm8k-chat")
    first = json.loads((run_dir / "results.json").read_text())
    assert first["config"]["task"] == "gsm8k" and first["config"]["mode"] == "chat"
    summary = json.loads((run_dir.parent / "summary.json").read_text())  # lm-evaluation-harness users' results file
    assert set(summary["runs"]) == {run_dir.name, only_run_dir(tmp_path, "gsm8k-fewshot").name}
    assert "acc" in summary["runs"][run_dir.name] and "acc_stderr" in summary["runs"][run_dir.name]
    assert run_cli(*replaced(argv, "--limit", "3")) == 0  # resumed: one more document
    second = json.loads((run_dir / "results.json").read_text())
    assert second["timings"]["serve"] > first["timings"]["serve"]
    assert sum(second["timings"].values()) == pytest.approx(second["seconds"], abs=0.1)
    assert second["config"]["task"] == "gsm8k"


def test_truncated_prompts_are_noted_under_the_table():  # 8
    from eval.pipeline import truncated_notes
    from eval.results import Record

    records = [Record(f"d/{i}", "", "h", 10, i == 0, {}, [], {}) for i in range(3)]
    assert truncated_notes(records) == ["1 of 3 documents had a prompt cut to fit the model's context "
                                        "(truncated: true in samples.jsonl)"]
    assert truncated_notes(records[1:]) == []


# ---- item 9: what the terminal says ---------------------------------------------------------------------------
def test_paths_counts_and_ctrl_c(capsys, monkeypatch):
    assert runner.shown_path("a\nb/run") == repr("a\nb/run") and runner.shown_path("a/b") == "a/b"
    assert (counted(1, "document"), counted(2, "request")) == ("1 document", "2 requests")

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run", interrupted)
    assert main(["--task", "mmlu"]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err


# ---- lm-evaluation-harness spellings ---------------------------------------------------------------------------
def test_lm_eval_spellings_that_map_cleanly_are_accepted():
    config = parse_config(["--tasks", "mmlu,gsm8k", "--batch_size", "auto", "--output_path", "out", "--log_samples",
                           "--limit", "3", "--batch_size=8"])
    assert (config.task, config.batch_size, config.output_dir, config.limit) == (("mmlu", "gsm8k"), 8, "out", 3)
    assert parse_config(["--task", "mmlu"]) == RunConfig(task=("mmlu",), backend_options=config.backend_options)


# ---- item 11: README and --help agree ------------------------------------------------------------------------
def test_readme_flag_table_lists_every_flag_and_help_matches_it():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    flags = [s for action in runner.parser()._actions for s in action.option_strings if s.startswith("--")]
    rows = "\n".join(line.split(" | ")[0] for line in readme.splitlines() if line.startswith("| `--"))
    missing = [f for f in flags if f != "--help" and not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", rows)]
    assert not missing, missing
    backend_help = next(a.help for a in runner.parser()._actions if "--backend" in a.option_strings)
    assert "at batch 1" not in backend_help
