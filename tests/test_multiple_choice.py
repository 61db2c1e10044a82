"""MMLU, C-Eval and CMMLU without a model: prompts, choice ids, truncation, averaging, extraction, data errors."""
import csv

import pytest

from eval.api import ChoiceResponse, Doc, GenerateResponse, UserError, shared_prefix_length
from eval.data import DataSource
from eval.tasks import ceval, cmmlu, mmlu
from fixtures import SHARED_DATA, write_ceval, write_cmmlu, write_mmlu

MMLU, CEVAL, CMMLU = mmlu.TASK, ceval.TASK, cmmlu.TASK


@pytest.fixture
def root(tmp_path):
    write_mmlu(tmp_path)
    write_ceval(tmp_path)
    write_cmmlu(tmp_path)
    return tmp_path


def test_mmlu_prompt_matches_the_spec_template(root, tok):
    doc = MMLU.load(DataSource(root), "fewshot", ["anatomy"])[1]
    (request,) = MMLU.requests(doc, tok, "fewshot", {})
    shot = "Question: {}\nA. {}\nB. {}\nC. {}\nD. {}\nAnswer: {}\n\n"
    expected = ("The following are multiple choice questions (with answers) about anatomy.\n\n"
                + "".join(shot.format(*row) for row in __import__("fixtures").MMLU_ROWS[:5])
                + "Question: Which planet is known as the red planet?\nA. Venus\nB. Mars\nC. Jupiter\nD. Saturn\nAnswer:")
    assert request.prompt == expected
    assert doc.doc_id == "mmlu/anatomy/1"
    assert request.choice_ids == (362, 425, 356, 422)
    assert list(request.tokens) == tok.encode(expected, nfc=True)
    assert 0 < request.shared_prefix < len(request.tokens)
    assert list(request.tokens[: request.shared_prefix]) == tok.encode(doc.data["fewshot"], nfc=True)[: request.shared_prefix]


class _Shifted:
    """Another tokenizer: the real one's ids moved by `shift`."""

    def __init__(self, tok, shift):
        self.tok, self.shift = tok, shift

    def encode(self, text, nfc=False):
        return [i + self.shift for i in self.tok.encode(text, nfc=nfc)]


def test_token_ids_cached_for_the_shots_and_choices_belong_to_their_tokenizer(root, tok):
    doc = MMLU.load(DataSource(root), "fewshot", ["anatomy"])[1]
    (first,) = MMLU.requests(doc, tok, "fewshot", {})
    (other,) = MMLU.requests(doc, _Shifted(tok, 7), "fewshot", {})
    assert other.choice_ids == tuple(i + 7 for i in first.choice_ids)
    assert other.shared_prefix == first.shared_prefix and list(other.tokens) == [i + 7 for i in first.tokens]


def test_shared_prefix_length_is_the_first_difference():
    import random

    rng = random.Random(0)
    for _ in range(500):
        prefix = [rng.randrange(4) for _ in range(rng.randrange(12))]
        ids = prefix[: rng.randrange(len(prefix) + 1)] + [rng.randrange(4) for _ in range(rng.randrange(12))]
        first = next((i for i, (a, b) in enumerate(zip(ids, prefix)) if a != b), min(len(ids), len(prefix)))
        assert shared_prefix_length(ids, tuple(prefix)) == first


def test_chinese_prompts_match_the_spec_template(root, tok):
    for task, subject in ((CEVAL, "logic"), (CMMLU, "arts")):
        doc = task.load(DataSource(root), "fewshot", [subject])[0]
        (request,) = task.requests(doc, tok, "fewshot", {})
        shot = "问题：{}\nA. {}\nB. {}\nC. {}\nD. {}\n答案：{}\n\n"
        from fixtures import CHINESE_ROWS

        expected = "".join(shot.format(*r) for r in CHINESE_ROWS[:5]) + "问题：1+1等于多少____\nA. 1\nB. 2\nC. 3\nD. 4\n答案："
        assert request.prompt == expected
        assert request.choice_ids == (32, 33, 34, 35)
        assert request.tokens[-2:] == (102349, 5122)  # 答案 ：


def test_chat_messages_match_the_spec(root, tok):
    doc = MMLU.load(DataSource(root), "chat", ["anatomy"])[0]
    (request,) = MMLU.requests(doc, tok, "chat", {})
    assert request.query == ("The following is a multiple-choice question. Please choose the most suitable one among "
                             "A, B, C and D as the answer to this question.\n\nWhat is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\n")
    assert list(request.tokens) == tok.make_context(request.query)[1]
    assert request.stop_ids == tok.chat_stop_ids
    doc = CEVAL.load(DataSource(root), "chat", ["logic"])[1]
    (request,) = CEVAL.requests(doc, tok, "chat", {})
    assert request.query == "中国的首都是____。\n\nA. 上海\nB. 北京\nC. 广州\nD. 深圳\n"


def test_mmlu_truncation_keeps_the_last_2047_tokens(root, tok):
    long_question = "word " * 2100
    doc = Doc("mmlu/anatomy/0", {"question": long_question, "A": "a", "B": "b", "C": "c", "D": "d", "answer": "A",
                                 "fewshot": "The following are ...\n\n"}, "anatomy")
    (request,) = MMLU.requests(doc, tok, "fewshot", {})
    full = tok.encode(request.prompt, nfc=True)
    assert request.truncated and len(request.tokens) == 2047 and list(request.tokens) == full[-2047:]
    assert request.shared_prefix == 0
    (short,) = CEVAL.requests(Doc("ceval/logic/0", {**doc.data, "fewshot": ""}, "logic"), tok, "fewshot", {})
    assert not short.truncated and len(short.tokens) > 2048  # C-Eval has no truncation


def _fixed_letter_backend(letter_for):
    """ChoiceResponses whose logits put `letter_for(doc)` first."""
    def respond(doc):
        logits = [0.0] * 4
        logits["ABCD".index(letter_for(doc))] = 1.0
        return [ChoiceResponse(tuple(logits), tuple(x / 2 for x in logits), True)]
    return respond


@pytest.mark.parametrize("task,subjects", [(MMLU, None), (CEVAL, None), (CMMLU, None)])
def test_oracle_scores_100_and_always_a_scores_the_share_of_a(task, subjects):
    root = SHARED_DATA if SHARED_DATA.exists() else None
    if root is None:
        pytest.skip("needs the real data")  # the fixture variant below runs everywhere
    _oracle_checks(task, DataSource(root), task.subjects[:6])


@pytest.mark.parametrize("task", [MMLU, CEVAL, CMMLU])
def test_oracle_on_fixtures(task, root):
    _oracle_checks(task, DataSource(root), None)


def _oracle_checks(task, data, subjects):
    docs = task.load(data, "fewshot", subjects) if subjects else task.load(data, "fewshot", sorted({
        s for s in task.subjects if (data.root / task.name).exists() and any((data.root / task.name).rglob(f"{s}*.csv"))}))
    gold = [task.score(d, _fixed_letter_backend(lambda d: d.data["answer"])(d), "fewshot", {}) for d in docs]
    scores = task.aggregate(docs, gold, "fewshot", {})
    assert scores.metrics["acc"] == 100.0 and scores.metrics["acc_parity"] == 100.0
    always_a = [task.score(d, _fixed_letter_backend(lambda d: "A")(d), "fewshot", {}) for d in docs]
    scores = task.aggregate(docs, always_a, "fewshot", {})
    per_subject = {}
    for d in docs:
        n, a = per_subject.get(d.subject, (0, 0))
        per_subject[d.subject] = (n + 1, a + (d.data["answer"] == "A"))
    if task.averaging == "micro":
        expected = 100 * sum(a for _, a in per_subject.values()) / len(docs)
    else:
        expected = sum(100 * a / n for n, a in per_subject.values()) / len(per_subject)
    assert scores.metrics["acc"] == pytest.approx(expected)


def _records(task, answers):
    """Hand-made: subject -> list of correct flags."""
    docs, records = [], []
    for subject, flags in answers.items():
        for i, ok in enumerate(flags):
            docs.append(Doc(f"{task.name}/{subject}/{i}", {"answer": "A"}, subject))
            records.append({"correct": ok, "correct_parity": ok, "tie": False})
    return docs, records


def test_micro_versus_macro_averaging():
    answers = {"anatomy": [True] * 9 + [False], "astronomy": [False, False]}  # 9/10 and 0/2
    docs, records = _records(MMLU, answers)
    assert MMLU.aggregate(docs, records, "fewshot", {}).metrics["acc"] == pytest.approx(75.0)  # 9/12
    answers = {"logic": [True] * 9 + [False], "law": [False, False]}
    docs, records = _records(CEVAL, answers)
    scores = CEVAL.aggregate(docs, records, "fewshot", {})
    assert scores.metrics["acc"] == pytest.approx(45.0)  # (90 + 0) / 2
    humanities = next(row for row in scores.table.rows if row[0] == "Humanities")
    assert humanities[1] == 12 and humanities[2] == pytest.approx(45.0)


def test_ceval_hard_and_cmmlu_overlapping_categories():
    docs, records = _records(CEVAL, {"advanced_mathematics": [True, False], "logic": [True, True]})
    rows = {row[0]: row for row in CEVAL.aggregate(docs, records, "fewshot", {}).table.rows}
    assert rows["Hard"][2] == pytest.approx(50.0) and rows["STEM"][2] == pytest.approx(50.0)
    docs, records = _records(CMMLU, {"chinese_history": [True, False, False, False], "arts": [True]})
    rows = {row[0]: row for row in CMMLU.aggregate(docs, records, "fewshot", {}).table.rows}
    assert rows["China specific"][2] == pytest.approx(25.0)  # chinese_history sits in Humanities too
    assert rows["Humanities"][2] == pytest.approx(62.5)


def test_ties_and_parity_prediction_are_reported():
    doc = Doc("mmlu/anatomy/0", {"answer": "B"}, "anatomy")
    record = MMLU.score(doc, [ChoiceResponse((1.0, 1.0, 0.5, 0.0), (0.2, 0.4, 0.2, 0.2), False)], "fewshot", {})
    assert record["pred"] == "A" and record["tie"]  # first on ties, as np.argmax
    assert record["pred_parity"] == "B" and record["correct_parity"]


MMLU_ROW = {"question": "q", "A": "Paris", "B": "London", "C": "Berlin", "D": "1", "answer": "B"}


@pytest.mark.parametrize("response,letter,rule", [
    ("The answer is B.", "B", "regex1"),
    ("I choose C", "C", "regex1"),
    ("B is correct", "B", "regex2"),
    ("D. because", "D", "regex3"),
    ("Clearly (A) fits", "A", "regex4"),
    ("It must be london", "B", "regex4"),  # option text becomes its letter first
    ("no letters here, just berlin-ish words", "C", "regex4"),
    ("Lond", "B", "fuzzy"),
])
def test_mmlu_chat_extraction(response, letter, rule):
    assert MMLU.extract(response, MMLU_ROW, {}) == (letter, rule)


def test_word_bounded_replacement_leaves_other_numbers_alone():
    row = {**MMLU_ROW, "D": "1"}
    assert MMLU.extract("I'd say 10 percent, so C", row, {})[0] == "D"  # parity: "1" in "10" becomes "D"
    assert MMLU.extract("I'd say 10 percent, so C", row, {"word_bounded": True})[0] == "C"


CEVAL_ROW = {"question": "中国的首都是____。", "A": "上海", "B": "北京", "C": "广州", "D": "深圳", "answer": "B"}


@pytest.mark.parametrize("response,letter,rule", [
    ("答案是B", "B", "regex1"),
    ("选C。", "C", "regex1"),
    ("A选项正确", "A", "regex2"),
    ("（D）", "D", "regex3"),
    ("首都是北京", "B", "regex4"),
    ("不知道", "A", "fuzzy"),
])
def test_ceval_chat_extraction(response, letter, rule):
    assert CEVAL.extract(response, CEVAL_ROW, {})[:2] == (letter, rule)


def test_ceval_old_rules_differ_where_the_spec_says():
    assert CEVAL.extract("选择：C", CEVAL_ROW, {"ceval_chat_rules": "2023-08-25"})[1] == "regex1"
    assert CEVAL.extract("（D）", CEVAL_ROW, {"ceval_chat_rules": "2023-08-03"})[1] != "regex3"


def test_chat_records_keep_the_raw_response_and_rule():
    doc = Doc("mmlu/anatomy/0", MMLU_ROW, "anatomy")
    rec = MMLU.score(doc, [GenerateResponse((1, 2), "  The answer is B. ", "stop")], "chat", {})
    assert rec["response"] == "The answer is B." and rec["rule"] == "regex1" and rec["correct"]
    scores = MMLU.aggregate([doc], [rec], "chat", {})
    assert scores.metrics["fuzzy_fallback_rate"] == 0.0 and scores.extra["rules"] == {"regex1": 1}


def test_pandas_parity_reads_none_as_nan_unless_verbatim(root):
    path = root / "mmlu" / "test" / "anatomy_test.csv"
    docs = MMLU.load(DataSource(root), "fewshot", ["anatomy"])
    assert docs[5].data["D"] == "nan"  # the original's pandas parsing
    docs = MMLU.load(DataSource(root, verbatim_csv=True), "fewshot", ["anatomy"])
    assert docs[5].data["D"] == "None"
    assert path.exists()


def test_bad_answer_names_file_and_row_or_is_skipped(root):
    path = root / "ceval" / "val" / "logic_val.csv"
    rows = list(csv.reader(open(path, encoding="utf-8")))
    rows[3][-1] = "E"
    csv.writer(open(path, "w", newline="", encoding="utf-8")).writerows(rows)
    with pytest.raises(UserError, match=r"^line 4 of \S+/ceval/val/logic_val.csv: answer 'E' is not one of A, B, C, D"):
        CEVAL.load(DataSource(root), "fewshot", ["logic"])
    data = DataSource(root, skip_bad_rows=True)
    assert len(CEVAL.load(data, "fewshot", ["logic"])) == 6 and len(data.skipped) == 1


def test_missing_columns_malformed_and_empty_files(root):
    path = root / "mmlu" / "test" / "anatomy_test.csv"
    path.write_text('q,a,b,c,d,A\n\n"What\nnow?",a,b,c\n')  # after a blank line, a 2-line row missing columns
    with pytest.raises(UserError, match="^line 3 of \\S+/anatomy_test.csv: missing answer"):
        MMLU.load(DataSource(root), "fewshot", ["anatomy"])
    path.write_text('q,a,b,c,d,A,extra,more\nq,a,b,c,d,A\n')  # pandas drops a first row's surplus fields silently
    with pytest.raises(UserError, match="^line 1 of \\S+/anatomy_test.csv: malformed CSV"):
        MMLU.load(DataSource(root), "fewshot", ["anatomy"])
    path.write_text("")
    with pytest.raises(UserError, match="anatomy_test.csv: empty file"):
        MMLU.load(DataSource(root), "fewshot", ["anatomy"])


def test_missing_subject_file_is_named(root):
    (root / "mmlu" / "dev" / "astronomy_dev.csv").unlink()
    with pytest.raises(UserError, match=r"mmlu/dev/astronomy_dev.csv not found \(subject astronomy\)"):
        MMLU.load(DataSource(root), "fewshot", ["astronomy"])


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data")
def test_dataset_sizes_on_the_real_data():
    data = DataSource(SHARED_DATA)
    assert len(MMLU.load(data, "chat")) == 14042
    assert len(CEVAL.load(data, "chat")) == 1346
    assert len(CMMLU.load(data, "chat")) == 11582
    assert (len(MMLU.subjects), len(CEVAL.subjects), len(CMMLU.subjects)) == (57, 52, 67)


def test_hub_without_network_says_how_to_go_local(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match="--data-dir"):
        MMLU.load(DataSource(None), "fewshot", ["anatomy"])
