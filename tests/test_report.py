"""`report`: published vs measured tables from hand-made run directories (no model), and the plots."""
import math

import pytest
from PIL import Image

import fixtures
from eval.api import Doc
from eval.plots import DPI, FIGSIZE
from eval import report as reporting
from eval.report import plot_run
from eval.stats import wilson
from eval.runner import main
from eval.tasks import ceval, gsm8k, long_ppl, mmlu

PNG_SIZE = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))


def write_run(root, model, name, task, mode, docs, records, *, n_docs=None, config=None):
    """A run directory as the pipeline writes it, scored by the task's own aggregate()."""
    flat = [{"doc_id": d.doc_id, "subject": d.subject, "doc": d.data, **r} for d, r in zip(docs, records)]
    return fixtures.write_run(root / model / name, task.name, mode, flat, n_docs=n_docs, config=config)


def multiple_choice_run(root, model, correct_per_subject, *, task=mmlu.TASK, mode="fewshot", name=None, n=100):
    """n documents per subject, the first `correct` of them answered right (in both scorings)."""
    docs, records = [], []
    for subject, correct in correct_per_subject.items():
        for i in range(n):
            docs.append(Doc(f"{task.name}/{subject}/{i}", {}, subject))
            records.append({"correct": i < correct, "correct_parity": i < correct, "correct_word_bounded": i < correct,
                            "tie": False, "truncated": False, "rule": "regex1"})
    return write_run(root, model, name or f"{task.name}-{mode}", task, mode, docs, records)


def gsm8k_run(root, model, n_correct, n_done, n_docs):
    docs = [Doc(f"gsm8k/{i}", {}) for i in range(n_done)]
    records = [{"parity": {"pred": 1, "correct": i < n_correct}, "improved": {"pred": 1, "correct": i < n_correct}}
               for i in range(n_done)]
    return write_run(root, model, "gsm8k-fewshot", gsm8k.TASK, "fewshot", docs, records, n_docs=n_docs)


def long_ppl_run(root, model, lengths=(1024, 2048), samples=6):
    docs, records = [], []
    for length in lengths:
        for i in range(samples):
            docs.append(Doc(f"long_ppl/paper/{length}/{i}", {"length": length}, "paper"))
            nll_per_token = math.log(4.23) + 0.01 * (i - (samples - 1) / 2)  # perplexity 4.23 on average
            cell = {"nll": nll_per_token * (length - 1), "n_tokens": length - 1}
            records.append({"length": length, "rows": dict.fromkeys(long_ppl.ROWS, cell)})
    return write_run(root, model, "long_ppl-fewshot", long_ppl.TASK, "fewshot", docs, records)


def report(root, capsys, *extra):
    assert main(["report", str(root), *extra]) == 0
    printed = capsys.readouterr().out
    written = (root / "REPORT.md").read_text()
    assert printed == f"{written}\nreport written to {root / 'REPORT.md'}\n"
    return written


def limited(run_dir, limit=2):
    """The run as a `--limit` invocation leaves it."""
    results = run_dir / "results.json"
    results.write_text(results.read_text().replace('"config": {}', f'"config": {{"limit": {limit}}}'))
    return run_dir


def table_row(text, label):
    rows = [line for line in text.splitlines() if line.startswith(f"| {label} |")]
    assert rows, f"no row {label!r}"
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def test_measured_number_difference_interval_and_verdict(tmp_path, capsys):
    multiple_choice_run(tmp_path, "Qwen-7B", {"anatomy": 70, "philosophy": 50, "marketing": 52, "sociology": 56})
    text = report(tmp_path, capsys)
    label, metric, reported, measured, difference, interval, within, run, notes = table_row(text, "MMLU 5-shot")
    assert (metric, reported, measured, difference) == ("acc_parity", "56.7", "57.00", "+0.30")
    low, high = wilson(57.0, 400)
    assert interval == f"[{low:.2f}, {high:.2f}]" == "[52.10, 61.76]"  # Wilson, checked by hand
    assert within == "yes" and run == "`Qwen-7B/mmlu-fewshot`" and notes == ""
    stem = table_row(text, "MMLU STEM")  # one subject of 100 documents: 70 right
    assert stem[3] == "70.00" and stem[4] == "+22.40" and stem[6] == "no"


def test_missing_task_is_not_run_and_partial_run_is_marked(tmp_path, capsys):
    gsm8k_run(tmp_path, "Qwen-7B", n_correct=26, n_done=50, n_docs=1319)
    text = report(tmp_path, capsys)
    assert table_row(text, "MMLU 5-shot")[3] == "not run"
    assert table_row(text, "HumanEval 0-shot pass@1")[3] == "not run"
    row = table_row(text, "GSM8K 8-shot")
    assert row[3] == "52.00" and "PARTIAL: 50 of 1319 documents" in row[8]
    assert table_row(text, "C-Eval test")[3] == "n/a"  # published, not measurable here
    assert "| `Qwen-7B/gsm8k-fewshot` | gsm8k | fewshot | Qwen-7B | 50 of 1319 | yes |" in text


def test_macro_average_gets_a_wilson_interval_at_its_effective_size(tmp_path, capsys):
    multiple_choice_run(tmp_path, "Qwen-7B", {"logic": 30, "law": 45}, task=ceval.TASK, n=50)
    row = table_row(report(tmp_path, capsys), "C-Eval val 5-shot")
    assert row[3] == "75.00"  # the mean of the subjects' 60% and 90%
    low, high = wilson(75.0, 2 ** 2 / (1 / 50 + 1 / 50))  # S^2 / sum(1/n): 100 documents
    assert row[5] == f"[{low:.2f}, {high:.2f}]"


def test_macro_interval_does_not_collapse_when_every_subject_is_zero(tmp_path, capsys):
    multiple_choice_run(tmp_path, "Qwen-7B", {"logic": 0, "law": 0}, task=ceval.TASK, n=50)
    row = table_row(report(tmp_path, capsys), "C-Eval val 5-shot")
    low, high = (float(x) for x in row[5].strip("[]").split(", "))
    assert row[3] == "0.00" and low == 0.0 and 3.0 < high < 4.0 and row[6] == "no"  # Wilson, n = 100


def test_a_subset_run_is_never_within_ci_and_the_models_are_named(tmp_path, capsys):
    gsm8k_run(tmp_path, "tiny-qwen-256", n_correct=0, n_done=2, n_docs=2)  # 0.00: Wilson [0, 65.8] holds 51.6
    limited(tmp_path / "tiny-qwen-256" / "gsm8k-fewshot")
    text = report(tmp_path, capsys)
    row = table_row(text, "GSM8K 8-shot")
    assert row[3] == "0.00" and row[6] == "n/a: not the whole benchmark"
    assert "measured model: tiny-qwen-256" in row[8] and "--limit 2" in row[8]
    assert "Published numbers of Qwen-7B; measured: tiny-qwen-256." in text


def test_chat_and_int4_rows_match_by_mode_and_model_name(tmp_path, capsys):
    multiple_choice_run(tmp_path, "Qwen-7B-Chat", {"anatomy": 54}, mode="chat")
    multiple_choice_run(tmp_path, "Qwen-7B-Chat-Int4", {"anatomy": 52}, mode="chat")
    multiple_choice_run(tmp_path, "Qwen-7B", {"anatomy": 10}, name="mmlu-fewshot-ntk_off-bf16")  # a switch variant
    multiple_choice_run(tmp_path, "other-model", {"anatomy": 20}, name="mmlu-fewshot-bf16")
    text = report(tmp_path, capsys)
    assert table_row(text, "MMLU 0-shot")[3] == table_row(text, "BF16 MMLU")[3] == "54.00"
    assert table_row(text, "Int4 MMLU")[3] == "52.00"
    assert table_row(text, "MMLU 5-shot")[7] == "`other-model/mmlu-fewshot-bf16`"  # the plain <task>-<mode> run wins
    only = report(tmp_path, capsys, "--model", "Qwen-7B")
    assert table_row(only, "MMLU 5-shot")[7] == "`Qwen-7B/mmlu-fewshot-ntk_off-bf16`"


def test_a_whole_run_is_preferred_over_a_limit_or_partial_one(tmp_path, capsys):
    limited(multiple_choice_run(tmp_path, "Qwen-7B", {"anatomy": 10}, name="mmlu-fewshot-bf16"))  # first by path
    multiple_choice_run(tmp_path, "Qwen-7B", {"anatomy": 60}, name="mmlu-fewshot-fp32")
    gsm8k_run(tmp_path, "Qwen-7B", n_correct=1, n_done=2, n_docs=10)  # partial, first by path
    whole = gsm8k_run(tmp_path / "later", "Qwen-7B", n_correct=5, n_done=10, n_docs=10)
    text = report(tmp_path, capsys)
    assert table_row(text, "MMLU 5-shot")[7] == "`Qwen-7B/mmlu-fewshot-fp32`"
    assert table_row(text, "GSM8K 8-shot")[7] == f"`{whole.relative_to(tmp_path)}`"
    assert "| `Qwen-7B/mmlu-fewshot-bf16` | mmlu | fewshot | Qwen-7B | 100 of 100 | no |" in text


def test_a_suites_own_runs_feed_its_rows_and_are_marked_used(tmp_path, capsys):
    """A `--limit 2` suite beside an older whole bf16 run of the same model: the report of the suite is
    about the suite's runs."""
    multiple_choice_run(tmp_path, "tiny", {"anatomy": 60}, name="mmlu-fewshot-bf16")
    own = limited(multiple_choice_run(tmp_path, "tiny", {"anatomy": 10}, name="mmlu-fewshot-fp32"))
    path = reporting.write_report(tmp_path, ["tiny"], own=[own], with_plots=False)
    text = path.read_text()
    assert path == tmp_path / "REPORT.md" and capsys.readouterr().out.endswith(f"report written to {path}\n")
    assert table_row(text, "MMLU 5-shot")[7] == "`tiny/mmlu-fewshot-fp32`"
    assert "| `tiny/mmlu-fewshot-fp32` | mmlu | fewshot | tiny | 100 of 100 | yes |" in text
    assert "| `tiny/mmlu-fewshot-bf16` | mmlu | fewshot | tiny | 100 of 100 | no |" in text


def test_a_model_with_no_run_is_an_error_and_keeps_the_report(tmp_path, capsys):
    multiple_choice_run(tmp_path, "Qwen-7B", {"anatomy": 60})
    before = report(tmp_path, capsys)
    assert main(["report", str(tmp_path), "--model", "Qwen-14B"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert "Qwen-14B" in err and "Qwen-7B" in err  # the models that have runs
    assert (tmp_path / "REPORT.md").read_text() == before


def test_perplexity_cells_get_a_bootstrap_interval(tmp_path, capsys):
    long_ppl_run(tmp_path, "Qwen-7B")
    text = report(tmp_path, capsys)
    row = table_row(text, "dynamic_ntk @ 1024")
    measured = float(row[3])
    low, high = (float(x) for x in row[5].strip("[]").split(", "))
    assert measured == 4.23 and low < measured < high and row[6] == "yes"
    assert table_row(text, "none @ 4096")[3] == "-" and "length 4096 not run" in table_row(text, "none @ 4096")[8]


def test_plots_are_valid_pngs_of_the_expected_size_and_linked(tmp_path, capsys):
    mmlu_dir = multiple_choice_run(tmp_path, "Qwen-7B", {"anatomy": 57, "philosophy": 60})
    ppl_dir = long_ppl_run(tmp_path, "Qwen-7B")
    text = report(tmp_path, capsys)
    for run_dir, name in ((mmlu_dir, "categories.png"), (ppl_dir, "perplexity.png")):
        path = tmp_path / "report-plots" / run_dir.relative_to(tmp_path) / name
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == PNG_SIZE
            image.verify()
        assert f"]({path.relative_to(tmp_path).as_posix()})" in text
    assert not list(tmp_path.rglob(".*.tmp"))
    assert "categories.png" not in report(tmp_path, capsys, "--no-plots")


def test_report_never_writes_into_a_run_directory(tmp_path, capsys):
    """`report results/` must leave the committed runs under results/reference/ as they are."""
    run_dir = long_ppl_run(tmp_path / "reference", "tiny-qwen-256")
    before = sorted(p.name for p in run_dir.iterdir())
    report(tmp_path, capsys)
    assert sorted(p.name for p in run_dir.iterdir()) == before
    assert (tmp_path / "report-plots" / "reference" / "tiny-qwen-256" / "long_ppl-fewshot" / "perplexity.png").exists()


def test_plot_run_skips_tasks_without_categories_or_lengths(tmp_path):
    run_dir = gsm8k_run(tmp_path, "Qwen-7B", n_correct=1, n_done=2, n_docs=2)
    assert plot_run(run_dir) == []


def test_missing_results_dir_is_a_user_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("table", ["BASE", "CHAT", "INT4", "LONG_PPL", "SPEED"])
def test_every_published_row_names_a_known_task_and_has_a_source(table):
    from eval import published
    from eval.registry import task_names

    t = getattr(published, table)
    assert t.source and t.rows
    for row in t.rows:
        assert row.task in (None, *task_names()) and (row.task or row.note)
