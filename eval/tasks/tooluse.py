"""Tool use (ReAct): Qwen's plugin benchmark; Tool Selection, Tool Input Rouge-L, False Positive.

Qwen-7B-Chat (original) reported on the v1 data 99% / 0.89 / 8.5% (9.7% in the HF-version rerun of
evaluate_plugin.py, which this task follows); on the v20231206 data 95.5% / 0.900 / 11.6% (spec 4.6, 8.2, 8.4).
Every metric here is in percent, as the other tasks' (Rouge-L F1 0.89 is shown as 89.0).
Each job's `prompt` (a full ReAct prompt with the tool descriptions) is one greedy ChatML user turn; the reply
is parsed and scored as QwenLM/Qwen eval/evaluate_plugin.py does since 2023-12-06: a call is "\\nAction: ",
action inputs are normalised through json5 ("" when unparseable). The v1 numbers were made with the earlier
rules ("Action:" anywhere, raw text kept on a parse failure), which are not scored here.
Generation stops at "Observation:", as a ReAct agent does; the original ran on to <|im_end|>. Both parsed
fields end at the first "Observation:", so stopping changes a score only when a marker first appears after
a hallucinated observation.
"""
import json
from functools import cache

import json5

from ..api import Doc, GenerateRequest, Option, Scores, Table, Task, UserError, chat_request
from ..data import DataSource
from ..published import TOOLUSE

SETS = ("positive", "negative")
VERSIONS = ("v20231206", "v1")  # without options["tooluse_version"], the first one present is used
FILE = "exam_plugin_{version}_react_{set}.jsonl"
DOWNLOAD = "https://qianwen-res.oss-cn-beijing.aliyuncs.com/opensource_data/exam_plugin_{version}/"
CALL = "\nAction: "  # how the original detects a tool call (since 2023-12-06)
# (metric, row name, set); the first row is the headline. Reported numbers: eval/published.py.
ROWS = (("tool_selection", "Tool Selection (%)", "positive"),
        ("tool_input_rouge_l", "Tool Input Rouge-L F1 (%)", "positive"),
        ("false_positive", "False Positive (%)", "negative"))


class _Whitespace:
    """The original's Rouge tokenizer: its inputs are already Qwen tokens joined by spaces."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


@cache
def rouge_l():
    """The Rouge-L scorer, made on first use: rouge_score imports nltk and scipy (seconds), which no other
    task's run should pay."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Whitespace())


def parse(text: str) -> dict:
    """The original's process_res: slices between `str.find` positions of the ReAct markers.

    A missing marker makes find() return -1: a slice then ends before the "\\n" appended first (hence the
    "\\n"), or starts at character len(marker) - 1 (kept: Tool Selection depends on it).
    """
    text += "\n"
    find, rfind = text.find, text.rfind

    def after(marker: str, at=find) -> int:
        return at(marker) + len(marker)

    return {"thought": text[: find("Action:")].strip(),
            "action": text[after("Action:"): find("Action Input:")].strip(),
            "action_input": normalise_input(text[after("Action Input:"): find("Observation:")].strip()),
            "observation": text[after("Observation:"): rfind("Thought:")].strip(),
            "thought_last": text[after("Thought:", rfind): find("Final Answer:")].strip(),
            "final_answer": text[after("Final Answer:"):].strip()}


def normalise_input(text: str) -> str:
    """Canonical JSON (sorted keys), so key order and quoting style do not count against Rouge; "" if unparseable."""
    try:
        return json.dumps(json5.loads(text), ensure_ascii=False, sort_keys=True)
    except (ValueError, RecursionError):
        return ""


def token_string(tok, text: str) -> str:
    """Qwen tokens (HF-wrapper path, NFC), each decoded alone with U+FFFD for partial bytes, joined by spaces."""
    return " ".join(tok.decode([i]) for i in tok.encode(text, nfc=True))


def find_files(data: DataSource, sets, version: str | None) -> tuple[str, dict]:
    """The data version asked for, else the first in VERSIONS whose files for these sets are all present."""
    if version not in (None, *VERSIONS):
        raise UserError(f"tooluse data version {version!r}: expected one of {', '.join(VERSIONS)}")
    if data.root is None:
        raise UserError("tooluse: the plugin benchmark is not on the Hugging Face hub; pass --data-dir ROOT "
                        "with the files under ROOT/tooluse/ (see EVALUATION.md, 'Tool use')")
    expected = []
    for v in (version,) if version else VERSIONS:
        paths = {s: data.root / "tooluse" / FILE.format(version=v, set=s) for s in sets}
        if all(p.exists() for p in paths.values()):
            return v, paths
        expected.append(" and ".join(map(str, paths.values())))
    raise UserError(f"tooluse: data not found; expected {', or '.join(expected)} (download them from "
                    f"{DOWNLOAD.format(version='<version>')}; see EVALUATION.md, 'Tool use')")


class ToolUse(Task):
    """Tool use as a ReAct agent: positive jobs should call the gold tool, negative jobs no tool at all."""

    name, version, modes, subjects = "tooluse", "qwen-2023-12", ("chat",), list(SETS)
    options = (Option("tooluse_version", "tool-use data set version (default: the newest whose files are present)",
                      choices=VERSIONS),)
    # the family's tool-selection rows (November 2023) name the data set they used
    published_options = {f"{size} chat": {"tooluse_version": "v20231206"} for size in ("1.8B", "14B", "72B")}

    def __init__(self, tok=None, data_version: str | None = None):
        # Rouge-L compares Qwen tokens of the *parsed* action inputs, so scoring needs the tokenizer; the task
        # protocol hands it to requests only, so plan_task gives it to the bound task instead (see bind).
        self.tok, self.data_version = tok, data_version

    def bind(self, data: DataSource, tok, options: dict) -> "ToolUse":
        return ToolUse(tok, options.get("tooluse_version"))

    def load(self, data: DataSource, mode: str, subjects=None) -> list[Doc]:
        sets = [s for s in SETS if not subjects or s in subjects]
        version, paths = find_files(data, sets, self.data_version)
        docs = []
        for s in sets:
            needed = ("prompt", "response") if s == "positive" else ("prompt",)  # negatives are scored without gold
            for line, row in data.read_jsonl(paths[s]):
                if not (isinstance(row, dict) and all(isinstance(row.get(k), str) for k in needed)):
                    data.bad_row(f"{paths[s]}:{line + 1}", f"expected a JSON object with string {' and '.join(needed)}")
                    continue
                docs.append(Doc(f"tooluse/{s}/{line}", {"prompt": row["prompt"], "response": row.get("response", ""),
                                                         "version": version}, s))
        return docs

    def requests(self, doc: Doc, tok, mode: str, options: dict) -> list[GenerateRequest]:
        return [chat_request(tok, doc.data["prompt"], stop=(("Observation:",),))]

    def score(self, doc: Doc, responses: list, mode: str, options: dict) -> dict:
        text = responses[0].text.strip()  # model.chat strips its reply
        called = CALL in text
        if doc.subject == "negative":
            return {"response": text, "called": called, "correct": not called}
        gen, gold = parse(text), parse(doc.data["response"])
        return {"response": text, "called": called, "action": gen["action"], "action_input": gen["action_input"],
                "gold_action": gold["action"], "gold_action_input": gold["action_input"],
                "correct": called and gen["action"].lower() == gold["action"].lower(),
                "rouge_l": self.rouge_l(gen["action_input"], gold["action_input"])}

    def rouge_l(self, generated: str, gold: str) -> float:
        if self.tok is None:
            raise UserError("tooluse: Rouge-L needs the Qwen tokenizer: re-scoring loads the run's --tokenizer or "
                            "--model, which could not be loaded")
        return rouge_l().score(token_string(self.tok, gold), token_string(self.tok, generated))["rougeL"].fmeasure

    def aggregate(self, docs: list[Doc], records: list[dict], mode: str, options: dict) -> Scores:
        version = docs[0].data["version"] if docs else ""
        by_set = {s: [r for d, r in zip(docs, records) if d.subject == s] for s in SETS}
        value = {"tool_selection": lambda rs: 100 * sum(r["correct"] for r in rs) / len(rs),
                 "tool_input_rouge_l": lambda rs: 100 * sum(r["rouge_l"] for r in rs) / len(rs),  # all positives
                 "false_positive": lambda rs: 100 * sum(r["called"] for r in rs) / len(rs)}
        table, metrics = Table(["name", "data", "n", "score", "reported"]), {}
        for key, name, s in ROWS:
            if by_set[s]:
                metrics[key] = value[key](by_set[s])
                table.rows.append([name, f"{version} {s}", len(by_set[s]), metrics[key], TOOLUSE[version][key]])
        return Scores(metrics, table, {"data_version": version, "n": {s: len(rs) for s, rs in by_set.items()}})


TASK = ToolUse()
