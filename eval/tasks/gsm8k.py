"""GSM8K (Cobbe et al. 2021): grade-school math word problems, 1,319 test problems; accuracy.

Qwen-7B (original) reported: base 8-shot 51.6; Qwen-7B-Chat 0-shot 41.1, 4-shot 43.5 (spec 8.1-8.2).
Base (spec 3.1): the 8-shot gsm8k_prompt.txt, greedy, the original's 4-stage cut, last `\\d+` against
the `####` gold. An improved extraction ("The answer is N" first, signed / comma / decimal numbers,
numeric compare) is scored beside it from the same generation.
Chat (spec 4.4): zero-shot (raw question) and 4-shot prompts, each scored with the v0 extraction
(last `\\d+` on both sides: the reported numbers) and the later v1 one (last-number regex, isclose).
The spec does not give the original's 4-shot exemplar text: CHAT_EXEMPLARS is a reconstruction from
the named GSM8K-train problems (reference reasoning, `<<...>>` annotations and `####` line removed).
The rendered block was checked byte-equal to QwenLM/Qwen eval/evaluate_chat_gsm8k.py (67adc5d).
"""
import hashlib
import warnings
import math
import re

from ..api import (AccuracyScores, Doc, GenerateRequest, Scores, Table, Task, chat_request, cut_at_each,
                   shared_prefix_length)
from ..data import DataSource
from ..published import reported

PROMPT_URL = "https://raw.githubusercontent.com/QwenLM/Qwen/main/eval/gsm8k_prompt.txt"
PROMPT_MD5 = "3bc72d9d58022e0682b87653e788ffdc"
QUERY_TEMPLATE = "\nQuestion: {question}\nLet's think step by step\n"  # appended to the prompt file
PARITY_CUTS = ("<|endoftext|>", "\n\n\n", "\n\n", "Question:")
GOLD_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
# v1 chat extraction (QwenLM/Qwen e8e1596), verbatim from spec 4.4.
PAT_LAST_DIGIT = re.compile(r"([+-])?(?=([0-9]|\.[0-9]))(0|([1-9](\d{0,2}(,\d{3})*)|\d*))?(\.\d*)?(?=\D|$)")
# Improved extraction: a sign only when not glued to a preceding digit ("5-3" is 3), strict thousands groups.
NUMBER = r"(?:(?<![\d.])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
ANSWER_IS = re.compile(rf"answer is:?\s*\$?\s*({NUMBER})", re.IGNORECASE)

# (question, reasoning, answer) of GSM8K train problems 4, 201, 140, 146 (see the module docstring).
CHAT_EXEMPLARS = (
    ("Angelo and Melanie want to plan how many hours over the next week they should study together for their "
     "test next week. They have 2 chapters of their textbook to study and 4 worksheets to memorize. They "
     "figure out that they should dedicate 3 hours to each chapter of their textbook and 1.5 hours for each "
     "worksheet. If they plan to study no more than 4 hours each day, how many days should they plan to study "
     "total over the next week if they take a 10-minute break every hour, include 3 10-minute snack breaks "
     "each day, and 30 minutes for lunch each day?",
     "Angelo and Melanie think they should dedicate 3 hours to each of the 2 chapters, 3 hours x 2 chapters = "
     "6 hours total.\n"
     "For the worksheets they plan to dedicate 1.5 hours for each worksheet, 1.5 hours x 4 worksheets = 6 "
     "hours total.\n"
     "Angelo and Melanie need to start with planning 12 hours to study, at 4 hours a day, 12 / 4 = 3 days.\n"
     "However, they need to include time for breaks and lunch. Every hour they want to include a 10-minute "
     "break, so 12 total hours x 10 minutes = 120 extra minutes for breaks.\n"
     "They also want to include 3 10-minute snack breaks, 3 x 10 minutes = 30 minutes.\n"
     "And they want to include 30 minutes for lunch each day, so 120 minutes for breaks + 30 minutes for snack"
     " breaks + 30 minutes for lunch = 180 minutes, or 180 / 60 minutes per hour = 3 extra hours.\n"
     "So Angelo and Melanie want to plan 12 hours to study + 3 hours of breaks = 15 hours total.\n"
     "They want to study no more than 4 hours each day, 15 hours / 4 hours each day = 3.75\n"
     "They will need to plan to study 4 days to allow for all the time they need.",
     4),
    ("Mark's basketball team scores 25 2 pointers, 8 3 pointers and 10 free throws.  Their opponents score "
     "double the 2 pointers but half the 3 pointers and free throws.  What's the total number of points scored"
     " by both teams added together?",
     "Mark's team scores 25 2 pointers, meaning they scored 25*2= 50 points in 2 pointers.\n"
     "His team also scores 6 3 pointers, meaning they scored 8*3= 24 points in 3 pointers\n"
     "They scored 10 free throws, and free throws count as one point so they scored 10*1=10 points in free "
     "throws.\n"
     "All together his team scored 50+24+10= 84 points\n"
     "Mark's opponents scored double his team's number of 2 pointers, meaning they scored 50*2=100 points in 2"
     " pointers.\n"
     "His opponents scored half his team's number of 3 pointers, meaning they scored 24/2= 12 points in 3 "
     "pointers.\n"
     "They also scored half Mark's team's points in free throws, meaning they scored 10/2=5 points in free "
     "throws.\n"
     "All together Mark's opponents scored 100+12+5=117 points\n"
     "The total score for the game is both team's scores added together, so it is 84+117=201 points",
     201),
    ("Bella has two times as many marbles as frisbees. She also has 20 more frisbees than deck cards. If she "
     "buys 2/5 times more of each item, what would be the total number of the items she will have if she "
     "currently has 60 marbles?",
     "When Bella buys 2/5 times more marbles, she'll have increased the number of marbles by 2/5*60 = 24\n"
     "The total number of marbles she'll have is 60+24 = 84\n"
     "If Bella currently has 60 marbles, and she has two times as many marbles as frisbees, she has 60/2 = 30 "
     "frisbees.\n"
     "If Bella buys 2/5 times more frisbees, she'll have 2/5*30 = 12 more frisbees.\n"
     "The total number of frisbees she'll have will increase to 30+12 = 42\n"
     "Bella also has 20 more frisbees than deck cards, meaning she has 30-20 = 10 deck cards\n"
     "If she buys 2/5 times more deck cards, she'll have 2/5*10 = 4 more deck cards.\n"
     "The total number of deck cards she'll have is 10+4 = 14\n"
     "Together, Bella will have a total of 14+42+84 = 140 items",
     140),
    ("A group of 4 fruit baskets contains 9 apples, 15 oranges, and 14 bananas in the first three baskets and "
     "2 less of each fruit in the fourth basket. How many fruits are there?",
     "For the first three baskets, the number of apples and oranges in one basket is 9+15=24\n"
     "In total, together with bananas, the number of fruits in one basket is 24+14=38 for the first three "
     "baskets.\n"
     "Since there are three baskets each having 38 fruits, there are 3*38=114 fruits in the first three "
     "baskets.\n"
     "The number of apples in the fourth basket is 9-2=7\n"
     "There are also 15-2=13 oranges in the fourth basket\n"
     "The combined number of oranges and apples in the fourth basket is 13+7=20\n"
     "The fourth basket also contains 14-2=12 bananas.\n"
     "In total, the fourth basket has 20+12=32 fruits.\n"
     "The four baskets together have 32+114=146 fruits.",
     146),
)
EXEMPLAR_TEMPLATE = "Question: {}\nLet's think step by step\n{}\nThe answer is {}\n\n"  # the base format
CHAT_FEWSHOT = "".join(EXEMPLAR_TEMPLATE.format(*exemplar) for exemplar in CHAT_EXEMPLARS)
CHAT_PROMPTS = ("zero_shot", "four_shot")
# Table rows: (record keys, row name, metric); the first row is the headline.
FEWSHOT_ROWS = ((("parity",), "parity (last integer)", "acc"),
                (("improved",), "improved (answer-first numeric)", "acc_improved"))
CHAT_ROWS = ((("zero_shot", "v0"), "0-shot, v0 (last integer)", "acc"),
             (("four_shot", "v0"), "4-shot, v0 (last integer)", "acc_4shot"),
             (("zero_shot", "v1"), "0-shot, v1 (last number, isclose)", "acc_v1"),
             (("four_shot", "v1"), "4-shot, v1 (last number, isclose)", "acc_4shot_v1"))


# ---- numbers as the original's `eval` reads them (never eval model output) ------------------------
def python_number(literal: str) -> int | float | None:
    """The value Python's eval gives a signed decimal literal; None where eval raises ("050", "", ".")."""
    match = re.fullmatch(r"(-?)([0-9]*)(\.?)([0-9]*)", literal.strip())  # eval reads ASCII digits only
    if not match:
        return None
    sign, whole, dot, frac = match.groups()
    if dot:
        return float(literal) if whole or frac else None
    if not whole or (whole[0] == "0" and whole.strip("0")):  # a leading zero makes an int literal a SyntaxError
        return None
    return int(sign + whole)


def last_integer(text: str) -> int | None:
    """Parity extraction (base, chat v0): the last run of digits."""
    runs = re.findall(r"\d+", text)
    return python_number(runs[-1]) if runs else None


def reference_gold(answer: str) -> int | float | None:
    """The `#### N` value of a reference answer (commas dropped), as the original evaluates it."""
    match = GOLD_RE.search(answer)
    return python_number(match.group(1).strip().replace(",", "")) if match else None


def last_number_v1(text: str) -> int | float | None:
    matches = list(PAT_LAST_DIGIT.finditer(text))
    return python_number(matches[-1].group().replace(",", "").replace("+", "")) if matches else None


def improved_answer(text: str) -> float | None:
    """"The answer is N" when stated, else the last number; sign, thousands commas and decimals kept."""
    stated = ANSWER_IS.findall(text)
    numbers = stated or re.findall(NUMBER, text)
    return float(numbers[-1].replace(",", "")) if numbers else None


def numbers_equal(pred, gold) -> bool:
    return pred is not None and gold is not None and math.isclose(pred, gold, rel_tol=0, abs_tol=1e-4)


def parity_truncate(text: str) -> str:
    return cut_at_each(text, PARITY_CUTS)


# ---- the task -------------------------------------------------------------------------------------
class GSM8K(Task):
    """GSM8K: grade-school math, chain of thought (base 8-shot; chat 0-shot and 4-shot)."""

    name, version, modes = "gsm8k", "qwen-2023-08", ("fewshot", "chat")
    unrecorded_fields = ("fewshot",)  # the 8-shot prompt, the same in every record

    def paired_scores(self, mode: str) -> AccuracyScores:
        keys = CHAT_ROWS[0][0] if mode == "chat" else FEWSHOT_ROWS[0][0]  # the headline row
        return AccuracyScores("acc", lambda record: float(_lookup(record, keys)["correct"]))

    def load(self, data: DataSource, mode: str, subjects=None) -> list[Doc]:
        fewshot = self.prompt_file(data) if mode == "fewshot" else ""
        docs = []
        for line, row, where in self.rows(data):
            gold = reference_gold(row["answer"]) if _has_text(row, "question") and _has_text(row, "answer") else None
            if gold is None:
                data.bad_row(where, "expected a question and an answer ending in '#### N'")
                continue
            docs.append(Doc(f"gsm8k/{line}", {"question": row["question"], "answer": row["answer"], "gold": gold,
                                              "fewshot": fewshot}))
        return docs

    def rows(self, data: DataSource) -> list[tuple[int, dict, str]]:
        if data.root is None:
            rows = data.hub("openai/gsm8k", "main", "test")
            return [(i, row, f"openai/gsm8k [test] row {i}") for i, row in enumerate(rows)]
        path = data.path("gsm8k", "test.jsonl")
        return [(line, row, f"{path}:{line + 1}") for line, row in data.read_jsonl(path)]

    def prompt_file(self, data: DataSource) -> str:
        path = data.path("gsm8k", "gsm8k_prompt.txt") if data.root else data.fetch(PROMPT_URL, "gsm8k/gsm8k_prompt.txt")
        digest = hashlib.md5(path.read_bytes()).hexdigest()
        if digest != PROMPT_MD5:  # a prompt variant is allowed, but never mistaken for the original
            warnings.warn(f"{path}: md5 {digest} is not the original Qwen eval/gsm8k_prompt.txt ({PROMPT_MD5}); "
                          f"scores are not comparable with the published numbers")
        return data.read_text(path)

    def requests(self, doc: Doc, tok, mode: str, options: dict) -> list[GenerateRequest]:
        if mode == "chat":
            return [chat_request(tok, query) for query in chat_queries(doc.data["question"])]
        fewshot = doc.data["fewshot"]
        prompt = fewshot + QUERY_TEMPLATE.format(question=doc.data["question"])
        ids = tok.encode(prompt)  # raw tiktoken, no NFC, as the original
        # Stopping at "\n\n"/"Question:" is exact: the parity cut discards everything after either anyway.
        return [GenerateRequest(prompt, tuple(ids), 512, stop=(("\n\n", "Question:"),), stop_ids=(tok.eod_id,),
                                shared_prefix=shared_prefix_length(ids, tok.encode(fewshot)))]

    def score(self, doc: Doc, responses: list, mode: str, options: dict) -> dict:
        if mode == "chat":
            answer = doc.data["answer"]
            return {prompt: score_chat(r.text.strip(), answer) for prompt, r in zip(CHAT_PROMPTS, responses)}
        gold, completion = doc.data["gold"], parity_truncate(responses[0].text)
        pred, improved = last_integer(completion), improved_answer(completion)
        return {"completion": completion, "gold": gold, "finish": responses[0].finish,
                "parity": {"pred": pred, "correct": pred is not None and pred == gold},
                "improved": {"pred": improved, "correct": numbers_equal(improved, gold)}}

    def aggregate(self, docs: list[Doc], records: list[dict], mode: str, options: dict) -> Scores:
        table = Table(["name", "n", "acc", "invalid", "reported"])
        metrics = {}
        for keys, name, metric in CHAT_ROWS if mode == "chat" else FEWSHOT_ROWS:
            results = [_lookup(rec, keys) for rec in records]
            metrics[metric] = 100 * sum(r["correct"] for r in results) / max(1, len(results))
            table.rows.append([name, len(results), metrics[metric], sum(r["pred"] is None for r in results),
                               reported(self.name, mode, metric) or ""])
        metrics["invalid"] = table.rows[0][3]
        return Scores(metrics, table, {"n": len(records)})


def chat_queries(question: str) -> tuple[str, str]:
    """Zero-shot: the raw question only; 4-shot: the exemplars, then the query without a final newline."""
    return question, f"{CHAT_FEWSHOT}Question: {question}\nLet's think step by step"


def score_chat(response: str, answer: str) -> dict:
    v0_pred, v0_gold = last_integer(response), last_integer(answer)
    v1_pred, v1_gold = last_number_v1(response), last_number_v1(answer)
    return {"response": response,
            "v0": {"pred": v0_pred, "gold": v0_gold, "correct": v0_pred is not None and v0_pred == v0_gold},
            "v1": {"pred": v1_pred, "gold": v1_gold, "correct": numbers_equal(v1_pred, v1_gold)}}


def _lookup(record: dict, keys: tuple[str, ...]) -> dict:
    for key in keys:
        record = record[key]
    return record


def _has_text(row, key: str) -> bool:
    return isinstance(row, dict) and isinstance(row.get(key), str)


TASK = GSM8K()
