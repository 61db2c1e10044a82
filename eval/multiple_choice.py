"""The one multiple-choice task that MMLU, C-Eval and CMMLU configure (spec sections 2 and 4.2-4.3).

Base (few-shot) mode: one forward per question; the prediction is the argmax of the four choice-token
logits in fp32 (ties reported); the original's bf16 softmax-of-softmax prediction is scored beside it
from the same forward. Chat mode: a zero-shot ChatML question, greedy answer, the original's
extraction cascade (every raw response kept with the rule that fired), plus a word-bounded variant.
"""
from __future__ import annotations

import re
from thefuzz import process

from .api import (AccuracyScores, ChoiceRequest, Doc, Option, Scores, Table, Task, UserError, chat_request,
                  shared_prefix_length)
from .data import DataSource, csv_record_lines
from .metrics import average

LETTERS = ("A", "B", "C", "D")


class MultipleChoiceTask(Task):
    name: str
    split: str  # the evaluated split
    categories: dict[str, tuple[str, ...]]  # category -> subjects (a subject may sit in several)
    extra_groups: dict[str, tuple[str, ...]] = {}  # reported beside the categories (C-Eval "Hard")
    averaging: str  # "micro" (MMLU) or "macro" (C-Eval, CMMLU)
    choice_strings: tuple[str, ...]  # tokenized for the choice ids
    max_prompt_tokens: int | None = None  # MMLU: longer prompts keep their last max-1 tokens
    modes = ("fewshot", "chat")
    unrecorded_fields = ("fewshot",)  # the subject's few-shot prefix, the same in every record
    n_shots = 5
    option_names = ("verbatim_csv",)

    @property
    def subjects(self) -> list[str]:
        return sorted({s for members in self.categories.values() for s in members})

    @property
    def groups(self) -> dict[str, tuple[str, ...]]:
        """The categories, then the extra groups: the rows between the average and the subjects."""
        return {**self.categories, **self.extra_groups}

    def paired_scores(self, mode: str) -> AccuracyScores:
        return AccuracyScores("acc", lambda record: float(record["correct"]), self.averaging, self.groups)

    def plot(self, results: dict, run_dir) -> list:
        from .plots import plot_categories

        return [plot_categories(results, list(self.groups), run_dir / "categories.png")]

    # ---- data -----------------------------------------------------------------------------------
    def rows(self, data: DataSource, subject: str, split: str) -> list[dict]:
        """[{question, A, B, C, D, answer}] of one subject and split, in file order."""
        raise NotImplementedError

    def load(self, data: DataSource, mode: str, subjects: list[str] | None = None) -> list[Doc]:
        docs = []
        for subject in subjects or self.subjects:
            shots = "" if mode == "chat" else self.fewshot_prefix(subject, self.rows(data, subject, "dev")[: self.n_shots])
            for index, row in enumerate(self.rows(data, subject, self.split)):
                where = row.pop("where", None) or f"{self.name}/{self.split}/{subject} row {index}"  # hub rows
                if self._valid(data, where, row):
                    docs.append(Doc(f"{self.name}/{subject}/{index}", {**row, "fewshot": shots}, subject))
        return docs

    def _valid(self, data: DataSource, where: str, row: dict) -> bool:
        if row["answer"] in LETTERS:
            return True
        found = "missing answer (a row with missing columns?)" if _is_missing(row["answer"]) else \
            f"answer {row['answer']!r} is not one of A, B, C, D"
        data.bad_row(where, found)
        return False

    # ---- prompts --------------------------------------------------------------------------------
    def fewshot_prefix(self, subject: str, shots: list[dict]) -> str:
        raise NotImplementedError

    def question(self, row: dict) -> str:
        """The few-shot query block, ending where the answer letter would follow."""
        raise NotImplementedError

    def chat_message(self, row: dict) -> str:
        raise NotImplementedError

    def requests(self, doc: Doc, tok, mode: str, options: dict) -> list:
        if mode == "chat":
            return [chat_request(tok, self.chat_message(doc.data))]
        prompt = doc.data["fewshot"] + self.question(doc.data)
        ids = tok.encode(prompt, nfc=True)  # the original tokenized through the HF wrapper: NFC
        shared = shared_prefix_length(ids, self._prefix_ids(tok, doc.data["fewshot"]))
        truncated = self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens
        if truncated:  # parity: keep the last max-1 tokens (may cut the header and part of the first shot)
            ids, shared = ids[-(self.max_prompt_tokens - 1):], 0
        choice_ids = self._encoded(tok, self.choice_strings, lambda strings: tuple(tok.encode(s)[-1] for s in strings))
        return [ChoiceRequest(prompt, tuple(ids), choice_ids, shared, truncated)]

    def _prefix_ids(self, tok, text: str) -> list[int]:
        return self._encoded(tok, text, lambda t: tok.encode(t, nfc=True))

    def _encoded(self, tok, key, encode):
        """encode(key), once per tokenizer: the shots and the choice tokens repeat for every question (14,042
        times in MMLU)."""
        cache = self.__dict__.setdefault("_token_cache", {})
        if (tok, key) not in cache:
            cache[tok, key] = encode(key)
        return cache[tok, key]

    # ---- scoring --------------------------------------------------------------------------------
    def score(self, doc: Doc, responses: list, mode: str, options: dict) -> dict:
        row, gold = doc.data, doc.data["answer"]
        if mode == "chat":
            text = responses[0].text.strip()
            options_text = [str(row[letter]) for letter in LETTERS]
            pred, rule = self.extract(text, row, options)
            bounded, _ = self.extract(text, row, {**options, "word_bounded": True})
            return {"gold": gold, "response": text, "pred": pred, "rule": rule, "correct": pred == gold,
                    "pred_word_bounded": bounded, "correct_word_bounded": bounded == gold, "options": options_text}
        r = responses[0]
        best = max(r.logits)
        pred = LETTERS[r.logits.index(best)]  # first on ties, as np.argmax
        pred_parity = LETTERS[r.parity_probs.index(max(r.parity_probs))]
        return {"gold": gold, "pred": pred, "correct": pred == gold, "tie": r.logits.count(best) > 1,
                "pred_parity": pred_parity, "correct_parity": pred_parity == gold,
                "logits": [round(x, 5) for x in r.logits], "parity_probs": [round(x, 5) for x in r.parity_probs],
                "top_in_choices": r.top_in_choices}

    def extract(self, response: str, row: dict, options: dict) -> tuple[str, str]:
        raise NotImplementedError

    # ---- aggregation ----------------------------------------------------------------------------
    def aggregate(self, docs: list[Doc], records: list[dict], mode: str, options: dict) -> Scores:
        columns = ["correct", "correct_word_bounded"] if mode == "chat" else ["correct", "correct_parity"]
        names = ["acc", "acc_word_bounded"] if mode == "chat" else ["acc", "acc_parity"]
        per_subject = _per_subject(docs, records, columns)
        groups = self.groups
        table = Table(["name", "n"] + names)
        overall = [_average(per_subject, list(per_subject), c, self.averaging) for c in columns]
        table.rows.append([f"AVERAGE ({self.averaging})", sum(s["n"] for s in per_subject.values())] + overall)
        for group, members in groups.items():
            present = [s for s in members if s in per_subject]
            if present:
                table.rows.append([group, sum(per_subject[s]["n"] for s in present)]
                                  + [_average(per_subject, present, c, self.averaging) for c in columns])
        for subject, stats in per_subject.items():
            table.rows.append([subject, stats["n"]] + [stats[c] for c in columns])
        metrics = dict(zip(names, overall))
        extra = {"per_subject": per_subject, "averaging": self.averaging, "n": len(records)}
        if mode == "chat":
            rules = {}
            for rec in records:
                rules[rec["rule"]] = rules.get(rec["rule"], 0) + 1
            extra["rules"] = rules
            metrics["fuzzy_fallback_rate"] = round(100 * rules.get("fuzzy", 0) / max(1, len(records)), 2)
        else:
            metrics["ties"] = sum(r["tie"] for r in records)
            metrics["truncated"] = sum(bool(r.get("truncated")) for r in records)
        return Scores(metrics, table, extra)


def _per_subject(docs: list[Doc], records: list[dict], columns: list[str]) -> dict[str, dict]:
    stats: dict[str, dict] = {}
    for doc, rec in zip(docs, records):
        s = stats.setdefault(doc.subject, {"n": 0, **{c: 0 for c in columns}})
        s["n"] += 1
        for c in columns:
            s[c] += bool(rec[c])
    return {subject: {"n": s["n"], **{c: 100 * s[c] / s["n"] for c in columns}, **{f"{c}_count": s[c] for c in columns}}
            for subject, s in sorted(stats.items())}


def _average(per_subject: dict, subjects: list[str], column: str, averaging: str) -> float:
    return average({s: (per_subject[s][f"{column}_count"], per_subject[s]["n"]) for s in subjects}, averaging)


# ---- chat answer extraction (shared pieces) --------------------------------------------------------
def replace_options(text: str, row: dict, strip: str, ignore_case: bool, word_bounded: bool) -> str:
    """Replace each option's text (trailing `strip` removed), longest first, by its letter."""
    for letter in sorted(LETTERS, key=lambda letter: -len(str(row[letter]))):
        option = str(row[letter]).rstrip(strip)
        if word_bounded:  # improvement: an option "1" or "a" no longer rewrites "10" or "a word"
            if option.strip():
                pattern = rf"(?<![A-Za-z0-9]){re.escape(option)}(?![A-Za-z0-9])"
                text = re.sub(pattern, letter, text, flags=re.I if ignore_case else 0)
        elif ignore_case:
            text = re.sub(re.escape(option), letter, text, flags=re.I)
        else:
            text = text.replace(option, letter)
    return text


def extract_with_cascade(text: str, row: dict, patterns: list[str]) -> tuple[str, str]:
    """The regex cascade (first pattern that matches wins), then the fuzzy fallback: always a letter."""
    for rule, pattern in enumerate(patterns, 1):
        match = re.search(pattern, text)
        if match:
            return match.group(1), f"regex{rule}"
    choices = [str(row[letter]) for letter in LETTERS]
    best = process.extractOne(text, choices)[0]
    return LETTERS[choices.index(best)], "fuzzy"


def subject_rows(frame, columns: dict[str, str], path, header: bool = True) -> list[dict]:
    """Rows as {question, A, B, C, D, answer} dicts, cells printed as the original's f-strings print
    them (pandas parsing: an option "None" reads as NaN and prints "nan"; see --verbatim-csv), each
    with "where": "line N of FILE" for error messages (load() takes it out again)."""
    missing = [c for c in columns.values() if c not in frame.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}")
    lines = csv_record_lines(path)[1 if header else 0:]
    rows = []
    for i, record in enumerate(frame[list(columns.values())].itertuples(index=False)):
        row = dict(zip(columns, record))
        row = {k: v if isinstance(v, str) or k == "answer" else f"{v}" for k, v in row.items()}
        rows.append({**row, "where": f"line {lines[i]} of {path}" if i < len(lines) else f"row {i} of {path}"})
    return rows


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and value != value)


# ---- C-Eval and CMMLU: one prompt format and chat extraction ---------------------------------------
# The chat extraction cascade, current version (QwenLM/Qwen 4864f7b, 2023-08-25).
RULES_2023_08_25 = [
    r"(?:(?:选|选择|选定)[：:]?\s*|(?:(?:答案|选项)(?![^ABCD]{0,10}?(?:不|非)[^ABCD]{0,10}?(?:是|选|为|：|:|】))[^ABCD]{0,10}?(?:是|选|为|：|:|】))[^ABCD]{0,10}?)(A|B|C|D)(?:选项)?(?:\)|。|\.|，|,|．|、|A|B|C|D|$|：|:|\)|）)",
    r"(A|B|C|D)(?:选?项)?(?![^ABCD]{0,4}?(?:不|非)[^ABCD]{0,4}?(?:正确|对[的，。：]|符合))[^ABCD]{0,4}?(?:正确|对[的，。：]|符合)",
    r"^[\(（]?(A|B|C|D)(?:。|\)|）|\.|，|,|．|：|:|$)",
    r"(?<![a-zA-Z])(A|B|C|D)(?![a-zA-Z=])",
]
# The version that produced the reported 54.2 (1134e08, 2023-08-03), rebuilt from the spec's list of differences.
RULES_2023_08_03 = [
    r"(?:(?:选|选择|选定)|(?:(?:答案|选项)(?![^ABCD]{0,10}?(?:不|非)[^ABCD]{0,10}?(?:是|为|：|:|】))[^ABCD]{0,10}?(?:是|为|：|:|】))[^ABCD]{0,10}?)(A|B|C|D)(?:选项)?(?:\)|。|\.|，|,|．|、|A|B|C|D|$)",
    r"(A|B|C|D)(?:选?项)?(?![^ABCD]{0,4}?(?:不|非)[^ABCD]{0,4}?(?:正确|对|符合))[^ABCD]{0,4}?(?:正确|对|符合)",
    r"^(A|B|C|D)(?:。|\.|，|,|．|$)",
    r"(?<![a-zA-Z])(A|B|C|D)(?![a-zA-Z=])",
]
CHAT_RULES = {"2023-08-25": RULES_2023_08_25, "2023-08-03": RULES_2023_08_03}


def chinese_question(row: dict) -> str:
    return f"问题：{row['question']}" + "".join(f"\n{x}. {row[x]}" for x in LETTERS) + "\n答案："


def extract_chinese(response: str, row: dict, options: dict) -> tuple[str, str]:
    """Spec 4.3: restate-the-question cleanup, option text -> letter, then the cascade."""
    parts = row["question"].rstrip("。").split("。")[-1].split("_")  # the last sentence, split on the blank
    if len(parts[0].strip()) > 4:
        response = response.replace(parts[0], "答案是")
    if len(parts[-1].strip()) > 4:
        response = response.replace(parts[-1], "")
    text = replace_options(response, row, strip="。", ignore_case=False, word_bounded=options.get("word_bounded", False))
    return extract_with_cascade(text, row, CHAT_RULES[options.get("ceval_chat_rules", "2023-08-25")])


class ChineseMultipleChoice(MultipleChoiceTask):
    """C-Eval and CMMLU share the 问题/答案 prompt, the letter ids and the chat extraction."""

    averaging = "macro"
    option_names = ("verbatim_csv",)
    options = (Option("ceval_chat_rules", "version of the chat C-Eval/CMMLU extraction regexes (default 2023-08-25)",
                      default="2023-08-25", choices=tuple(CHAT_RULES)),)
    choice_strings = ("A", "B", "C", "D")  # the prompt ends in "答案：" (its own token); shots answer "A"

    def fewshot_prefix(self, subject: str, shots: list[dict]) -> str:
        return "".join(f"{self.question(s)}{s['answer']}\n\n" for s in shots)

    def question(self, row: dict) -> str:
        return chinese_question(row)

    def chat_message(self, row: dict) -> str:
        return f"{row['question']}\n\n" + "".join(f"{x}. {row[x]}\n" for x in LETTERS)

    def extract(self, response: str, row: dict, options: dict) -> tuple[str, str]:
        return extract_chinese(response, row, options)
