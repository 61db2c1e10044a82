"""long_ppl: sample cutting, the four switch rows, token-weighted aggregation, and a tiny model end to end."""
import math

import pytest

from checkpoints import tiny_model
from eval.api import Doc, LoglikelihoodResponse, UserError, serve
from eval.backends import NativeBackend
from eval.data import DataSource
from eval.pipeline import plan_task
from eval.tasks.long_ppl import ROWS, TASK, sample_starts

TEXT = "The quick brown fox jumps over the lazy dog. " * 60  # 601 tokens with the Qwen vocabulary


@pytest.fixture
def data(tmp_path) -> DataSource:
    root = tmp_path / "longctx_arxiv"
    for name, repeat in (("a/0001/paper.body", 1), ("b/other", 2)):
        path = root / f"{name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(TEXT * repeat)
    (root / "loogle").mkdir()
    (root / "loogle" / "summaries.jsonl").write_text('{"input": "not a plain-text document"}\n')
    return DataSource(tmp_path)


def bound(data, tok, **options):
    return TASK.bind(data, tok, options)


def test_samples_start_at_multiples_of_the_length_and_are_complete():
    assert list(sample_starts(10, 3)) == [0, 3, 6]
    assert list(sample_starts(9, 3)) == [0, 3, 6]
    assert list(sample_starts(2, 3)) == []


def test_documents_are_txt_files_named_by_path_and_cut_per_length(data, tok):
    task = bound(data, tok, lengths=[100, 250])
    assert task.subjects == ["a/0001/paper.body", "b/other"]  # the jsonl is ignored
    docs = task.load(data, "fewshot", ["a/0001/paper.body"])
    n = len(tok.encode(TEXT))
    assert [d.doc_id for d in docs][:4] == ["long_ppl/a/0001/paper.body/100/0", "long_ppl/a/0001/paper.body/250/0",
                                          "long_ppl/a/0001/paper.body/100/1", "long_ppl/a/0001/paper.body/250/1"]
    for length in (100, 250):
        starts = [d.data["start"] for d in docs if d.data["length"] == length]
        assert starts == list(range(0, n - length + 1, length))
    assert {d.subject for d in docs} == {"a/0001/paper.body"}


def test_four_requests_per_sample_with_their_switches(data, tok):
    task = bound(data, tok, lengths=[100])
    doc = task.load(data, "fewshot")[1]
    requests = task.requests(doc, tok, "fewshot", {"window_attn": "2x50,100"})
    ids = tok.encode(TEXT)
    assert all(r.tokens == tuple(ids[100:200]) for r in requests)
    assert [dict(r.switches) for r in requests] == [
        {"dynamic_ntk": False, "logn": False, "window_attn": "none"},
        {"dynamic_ntk": True, "logn": False, "window_attn": "none"},
        {"dynamic_ntk": True, "logn": True, "window_attn": "none"},
        {"dynamic_ntk": True, "logn": True, "window_attn": "2x50,100"},
    ]
    assert dict(task.requests(doc, tok, "fewshot", {})[3].switches)["window_attn"] == "auto"


def test_perplexity_is_token_weighted_per_length():
    def record(length, nll, n):
        return {"length": length, "rows": {row: {"nll": nll, "n_tokens": n} for row in ROWS}}

    records = [record(4, 3.0, 3), record(4, 9.0, 3), record(8, 7.0, 7)]
    docs = [Doc(f"long_ppl/d/{r['length']}/{i}", {"length": r["length"]}, "d") for i, r in enumerate(records)]
    scores = TASK.aggregate(docs, records, "fewshot", {"lengths": [4, 8, 16]})
    assert scores.metrics["ppl_none_4"] == pytest.approx(math.exp(12 / 6))  # not the mean of exp(1) and exp(3)
    assert scores.metrics["ppl_dynamic_ntk+logn_8"] == pytest.approx(math.e)
    assert scores.table.columns == ["switches", "4", "8", "16"]
    assert [row[0] for row in scores.table.rows] == [*ROWS[:3], "dynamic_ntk+logn+window (auto)", "samples"]
    assert scores.table.rows[0][3] is None and scores.table.rows[-1][1:] == [2, 1, 0]


def test_tiny_model_end_to_end_ntk_matters_only_past_the_training_length(data, tok):
    model = tiny_model(seed=3)  # seq_length 64
    task = bound(data, tok, lengths=[32, 64, 128])
    options = {"lengths": [32, 64, 128], "window_attn": "auto"}
    docs = [d for d in task.load(data, "fewshot", ["b/other"]) if d.data["sample"] < 2]  # a CPU-sized subset
    per_doc = [task.requests(d, tok, "fewshot", options) for d in docs]
    flat = serve(NativeBackend(model, tok, progress=False), [r for rs in per_doc for r in rs])
    assert all(isinstance(r, LoglikelihoodResponse) for r in flat)
    records = [task.score(d, flat[4 * k: 4 * k + 4], "fewshot", options) for k, d in enumerate(docs)]
    ppl = task.aggregate(docs, records, "fewshot", options).metrics
    for length in (32, 64):
        assert ppl[f"ppl_none_{length}"] == pytest.approx(ppl[f"ppl_dynamic_ntk_{length}"], rel=1e-6)
    assert ppl["ppl_none_128"] != pytest.approx(ppl["ppl_dynamic_ntk_128"], rel=1e-4)
    # windows (64, 128) and LogN change nothing within the training length either
    assert ppl["ppl_dynamic_ntk+logn+window_32"] == pytest.approx(ppl["ppl_none_32"], rel=1e-6)
    assert all(r["rows"]["none"]["n_tokens"] == r["length"] - 1 for r in records)


def test_subjects_select_documents_through_plan_task(data, tok, tmp_path):
    plan = plan_task(TASK, "fewshot", data, tok, subjects=["b/other"], options={"lengths": [200]}, run_dir=tmp_path)
    assert {d.subject for d in plan.docs} == {"b/other"} and len(plan.requests[0]) == 4
    with pytest.raises(UserError, match="unknown long_ppl subject"):
        plan_task(TASK, "fewshot", data, tok, subjects=["c/missing"], options={}, run_dir=tmp_path)


def test_without_a_data_dir_the_error_says_to_pass_one(tok, tmp_path):
    with pytest.raises(UserError, match="--data-dir"):
        plan_task(TASK, "fewshot", DataSource(None), tok, options={}, run_dir=tmp_path)
    with pytest.raises(UserError, match="longctx_arxiv"):
        plan_task(TASK, "fewshot", DataSource(tmp_path), tok, options={}, run_dir=tmp_path)


def test_lengths_past_every_document_name_the_flag(data, tok, tmp_path):
    longest = len(tok.encode(TEXT * 2))  # b/other holds the text twice
    with pytest.raises(UserError, match=rf"^--lengths 10000000: longer than every long_ppl document "
                                        rf"\(the longest has {longest} tokens\)"):
        plan_task(TASK, "fewshot", data, tok, options={"lengths": [100, 10000000]}, run_dir=tmp_path)
