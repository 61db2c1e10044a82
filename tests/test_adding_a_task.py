"""EVALUATION.md's "Adding a task" example, run as written: one file and one registry name give a task with
its own option, flag, check and identity."""
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from eval import registry
from checkpoints import vocab_file
from eval.runner import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def echo_task(tmp_path, monkeypatch):
    """The example's file as eval/tasks/echo.py, and its name in the registry."""
    text = (REPO / "EVALUATION.md").read_text(encoding="utf-8")
    section = text.split("## Adding a task", 1)[1]
    source = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    path = tmp_path / "echo.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("eval.tasks.echo", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "eval.tasks.echo", module)
    spec.loader.exec_module(module)
    monkeypatch.setattr(registry, "TASK_MODULES", (*registry.TASK_MODULES, "echo"))
    return module.TASK


def test_the_example_task_gets_its_flag_check_and_default(echo_task, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--echo-repeat" in capsys.readouterr().out
    argv = ["--task", "echo", "--dry-run", "--tokenizer", vocab_file(), "--output-dir", tmp_path]
    assert main(argv) == 0
    lines = [json.loads(x) for x in next(tmp_path.rglob("requests.jsonl")).read_text().splitlines()]
    assert [x["prompt"] for x in lines] == list(sys.modules["eval.tasks.echo"].SENTENCES)
    assert main([*argv, "--echo-repeat", "2", "--output-dir", tmp_path / "two"]) == 0
    lines = [json.loads(x) for x in next((tmp_path / "two").rglob("requests.jsonl")).read_text().splitlines()]
    assert lines[0]["prompt"] == "The cat sat on the mat. The cat sat on the mat."
    capsys.readouterr()
    assert main([*argv, "--echo-repeat", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --echo-repeat 0: expected a number above 0"


def test_the_example_task_runs_and_records_its_option(echo_task, tiny_checkpoint, tmp_path):
    argv = ["--task", "echo", "--model", tiny_checkpoint, "--output-dir", tmp_path, "--no-progress",
            "--echo-repeat", "3"]
    assert main(argv) == 0
    run = json.loads(next(tmp_path.rglob("run.json")).read_text())
    assert run["identity"]["options"] == {"echo_repeat": 3}
    assert main([*argv[:-1], "2"]) == 2  # another value is another run: refused, not mixed in
