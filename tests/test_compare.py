"""`compare`: the paired regression gate on hand-made run directories (no model)."""
import pytest

import fixtures
from eval.stats import mcnemar_exact
from eval.runner import main

SUBJECTS = ("anatomy", "philosophy")


def write_run(run_dir, records, *, data="d1", task="mmlu", mode="fewshot", partial=False):
    """A run as the pipeline leaves it (compare reads run.json, samples.jsonl and results.json's `partial`)."""
    return fixtures.write_run(run_dir, task, mode, records, identity={"data": {"test.csv": data}},
                              n_docs=len(records) + partial, aggregate=False)


def mc_records(n=200, correct=0.7, wrong=()):
    """n MMLU documents over two subjects; the first `correct` share right, except the doc ids in `wrong`."""
    records = []
    for i in range(n):
        doc_id = f"mmlu/{SUBJECTS[i % 2]}/{i // 2}"
        right = i < correct * n and doc_id not in wrong
        records.append({"doc_id": doc_id, "subject": SUBJECTS[i % 2], "prompt_hash": f"p{i}", "correct": right})
    return records


def compare(base, new, *extra):
    return main(["compare", str(base), str(new), *extra])


def test_identical_runs_are_no_regression(tmp_path, capsys):
    base = write_run(tmp_path / "base" / "m" / "mmlu-fewshot", mc_records())
    new = write_run(tmp_path / "new" / "m" / "mmlu-fewshot", mc_records())
    assert compare(base, new) == 0
    out = capsys.readouterr().out
    assert "| acc (micro) | 200 | 70.00 | 70.00 | +0.00 | 0.00 | McNemar | 1 | 0 | 0 | ok |" in out
    assert "no regression" in out


def test_ten_percent_flipped_to_wrong_fails_and_lists_them(tmp_path, capsys):
    base_records = mc_records()
    flipped = [r["doc_id"] for r in base_records if r["correct"]][::7][:20]  # 20 of 200 documents
    base = write_run(tmp_path / "base" / "m" / "mmlu-fewshot", base_records)
    new = write_run(tmp_path / "new" / "m" / "mmlu-fewshot", mc_records(wrong=set(flipped)))
    assert compare(base, new) == 1
    out = capsys.readouterr().out
    p = mcnemar_exact(20, 0)
    assert f"| acc (micro) | 200 | 70.00 | 60.00 | -10.00 | 10.00 | McNemar | {p:.3g} | 20 | 0 | REGRESSION |" in out
    listed = out.split("right -> wrong (20): ")[1].split("\n\n")[0]
    assert sorted(listed.replace("\n", " ").replace(",", " ").split()) == sorted(flipped)
    assert "wrong -> right (0): -" in out
    assert "| STEM |" in out and "| Humanities |" in out  # per-category deltas, not gated
    assert "REGRESSION (drop >= 1)" in out


def test_a_small_or_insignificant_drop_passes(tmp_path, capsys):
    base_records = mc_records()
    base = write_run(tmp_path / "base" / "mmlu-fewshot", base_records)
    new_records = mc_records(wrong={"mmlu/anatomy/0", "mmlu/philosophy/0", "mmlu/anatomy/1"})
    new_records[-1]["correct"] = True  # one wrong -> right
    new = write_run(tmp_path / "new" / "mmlu-fewshot", new_records)
    assert compare(base, new, "--alpha", "0.05") == 0  # drop 1 point, but p = 0.625
    assert compare(base, new) == 1  # the drop alone decides
    assert compare(base, new, "--max-drop", "2") == 0


def test_max_drop_gates_a_drop_with_p_1(tmp_path, capsys):
    """--max-drop 0.1 fails a 0.96-point drop (1 of 104 documents flipped, exact McNemar p = 1), as its help says."""
    base = write_run(tmp_path / "base" / "mmlu-fewshot", mc_records(n=104))
    new = write_run(tmp_path / "new" / "mmlu-fewshot", mc_records(n=104, wrong={"mmlu/anatomy/0"}))
    assert compare(base, new, "--max-drop", "0.1") == 1
    out = capsys.readouterr().out
    assert "| 0.96 | McNemar | 1 |" in out and "REGRESSION (drop >= 0.1)" in out
    assert compare(base, new, "--max-drop", "0.1", "--alpha", "0.05") == 0


def test_different_prompts_or_data_are_refused(tmp_path, capsys):
    base = write_run(tmp_path / "base" / "mmlu-fewshot", mc_records())
    changed = mc_records()
    changed[3]["prompt_hash"] = "another prompt"
    new = write_run(tmp_path / "new" / "mmlu-fewshot", changed)
    assert compare(base, new) == 2
    assert "1 of 200 shared documents have different prompts (first: mmlu/philosophy/1)" in capsys.readouterr().err
    assert compare(base, new, "--allow-different-prompts") == 0
    assert "WARNING: 1 of 200 shared documents have different prompts" in capsys.readouterr().out
    other_data = write_run(tmp_path / "other" / "mmlu-fewshot", mc_records(), data="d2")
    assert compare(base, other_data) == 2
    assert "the data files differ" in capsys.readouterr().err


def test_different_tasks_or_missing_runs_are_user_errors(tmp_path, capsys):
    base = write_run(tmp_path / "base" / "mmlu-fewshot", mc_records())
    chat = write_run(tmp_path / "new" / "mmlu-chat", mc_records(), mode="chat")
    assert compare(base, chat) == 2
    assert compare(base, tmp_path / "nowhere") == 2
    assert compare(base, base, "--alpha", "0") == 2
    assert "cannot compare mmlu (fewshot)" in capsys.readouterr().err


def test_runs_of_two_tasks_are_named_as_such(tmp_path, capsys):
    """An mmlu and a gsm8k run share no documents; what differs is the task, and the refusal says so."""
    mmlu = write_run(tmp_path / "base" / "mmlu-fewshot", mc_records())
    gsm8k = write_run(tmp_path / "new" / "gsm8k-fewshot", [{"doc_id": "gsm8k/0", "parity": {"correct": True}}],
                      task="gsm8k")
    assert compare(mmlu, gsm8k) == 2
    err = capsys.readouterr().err
    assert "different tasks" in err and "mmlu (fewshot)" in err and "gsm8k (fewshot)" in err
    assert "share no documents" not in err


def test_result_directories_are_paired_by_run_name(tmp_path, capsys):
    for side, flips in (("base", ()), ("new", ("mmlu/anatomy/0",))):
        write_run(tmp_path / side / f"{side}-model" / "mmlu-fewshot", mc_records(wrong=set(flips)))
        gsm8k = [{"doc_id": f"gsm8k/{i}", "subject": "", "prompt_hash": f"g{i}",
                  "parity": {"correct": i % 2 == 0}} for i in range(40)]
        write_run(tmp_path / side / f"{side}-model" / "gsm8k-fewshot", gsm8k, task="gsm8k")
    write_run(tmp_path / "base" / "base-model" / "ceval-fewshot", mc_records(), task="ceval")
    assert compare(tmp_path / "base", tmp_path / "new") == 0
    out = capsys.readouterr().out
    assert "## mmlu (fewshot)" in out and "## gsm8k (fewshot)" in out and "right -> wrong (1): mmlu/anatomy/0" in out
    assert "not compared: ceval-fewshot: only in base" in out


def test_pass_rates_of_several_samples_use_a_paired_bootstrap(tmp_path, capsys):
    def records(passed):
        return [{"doc_id": f"HumanEval/{i}", "subject": "", "prompt_hash": f"h{i}",
                 "parity": [{"status": "passed" if k < passed(i) else "failed"} for k in range(4)]} for i in range(60)]

    base = write_run(tmp_path / "base" / "humaneval-fewshot", records(lambda i: 3), task="humaneval")
    new = write_run(tmp_path / "new" / "humaneval-fewshot", records(lambda i: 1), task="humaneval")
    assert compare(base, new) == 1
    out = capsys.readouterr().out
    assert "| pass@1 (micro) | 60 | 75.00 | 25.00 | -50.00 | 50.00 | bootstrap |" in out
    assert "pass rate down (60): HumanEval/0, HumanEval/1" in out


def ppl_records(nll_per_token, lengths=(256, 512), samples=8):
    return [{"doc_id": f"long_ppl/paper/{length}/{i}", "subject": "paper", "prompt_hash": f"{length}/{i}",
             "length": length, "rows": {row: {"nll": (nll_per_token + 0.01 * i) * (length - 1), "n_tokens": length - 1}
                                        for row in ("none", "dynamic_ntk")}}
            for length in lengths for i in range(samples)]


@pytest.mark.parametrize("new_nll,expected", [(1.5, 0), (1.6, 1)])
def test_perplexity_is_compared_per_document_nll(tmp_path, capsys, new_nll, expected):
    base = write_run(tmp_path / "base" / "long_ppl-fewshot", ppl_records(1.5), task="long_ppl")
    new = write_run(tmp_path / "new" / "long_ppl-fewshot", ppl_records(new_nll), task="long_ppl")
    assert compare(base, new) == expected
    out = capsys.readouterr().out
    assert "| ppl none (all lengths) | 16 |" in out and "| ppl dynamic_ntk @ 512 | 8 |" in out
    if expected:  # perplexity up by exp(0.1) - 1 = 10.5%
        assert "| ppl none (all lengths) | 16 | 4.64 | 5.13 | +0.49 | 10.52% | bootstrap |" in out


def test_runs_at_two_batch_sizes_are_identical(tiny_checkpoint, data_root, tmp_path, capsys):
    """One model at --batch-size 1 and 3: every raw output equal, zero flips, and compare says so."""
    args = ["--task", "mmlu", "--model", str(tiny_checkpoint), "--data-dir", str(data_root), "--subjects",
            "anatomy,astronomy", "--limit", "3", "--no-progress"]
    assert main([*args, "--batch-size", "1", "--output-dir", str(tmp_path / "b1")]) == 0
    assert main([*args, "--batch-size", "3", "--output-dir", str(tmp_path / "b3")]) == 0
    capsys.readouterr()
    assert compare(tmp_path / "b1", tmp_path / "b3") == 0
    out = capsys.readouterr().out
    assert "model outputs: identical for all" in out and "the runs are identical" in out
    assert "| 0 | 0 | ok |" in out  # no document flipped either way
