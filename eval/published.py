"""The published Qwen (v1) numbers that `report` sets beside measured ones, each table with its source.

Qwen-7B (original): transcribed from ../shared/docs/reference-qwen-eval.md section 8, which read them from
the QwenLM/Qwen README revisions, tech_memo.md and the Hugging Face model cards (the revision is named per
table). Qwen-1.8B, -14B and -72B: read from the QwenLM/Qwen README at revision 85cb093f (README_REV), section
by section as each table names; what that README does not publish is left out (EVALUATION.md, "The Qwen
family"). A table describes one model size (`size`); the report matches runs to it by the model shape each
run records, never by folder name.
A row with `task` None has no task in this harness (its note says why) and is shown, not measured.

How a row is measured (eval/report.py): `metric` is a key of results.json "metrics"; with `part`,
a row of the run's table (a category of a multiple-choice suite) or, for long_ppl, a
(switch row, length) cell.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    label: str
    reported: float
    task: str | None = None
    metric: str = ""
    part: str | tuple[str, int] | None = None
    model: str = ""  # when it differs from the table's model (the Int4 rows)
    note: str = ""


@dataclass(frozen=True)
class Table:
    title: str
    source: str
    model: str  # the published model's name, as a checkpoint directory or hub id would be called
    mode: str | None  # the runner's --mode; None: any (speed does not depend on the prompt format)
    rows: tuple[Row, ...]
    size: str = "7B"  # the model size it describes: a key of SIZES


# (hidden, layers, heads, MLP width) of each released size, as its config.json gives them (the MLP width is
# the config's intermediate_size halved, as the model uses it); EVALUATION.md, "The Qwen family", cites each.
SIZES = {"1.8B": (2048, 24, 16, 5504), "7B": (4096, 32, 32, 11008), "14B": (5120, 40, 40, 13696),
         "72B": (8192, 80, 64, 24576)}


def size_of(shape: dict | None) -> str | None:
    """The released size a recorded model shape (model.config.model_shape) belongs to; None: no release."""
    if not shape:
        return None
    key = tuple(shape.get(k) for k in ("dim", "n_layer", "n_head", "intermediate_size"))
    return next((size for size, dims in SIZES.items() if dims == key), None)


def _ceval_test(average, hard, stem, social, humanities, other) -> tuple[Row, ...]:
    """C-Eval test rows: published, but not measurable (hard None: not published)."""
    note = "C-Eval test split: answers hidden (leaderboard submission only)"
    return tuple(Row(label, value, note=note) for label, value in (
        ("C-Eval test", average), ("C-Eval test Avg-Hard", hard), ("C-Eval test STEM", stem),
        ("C-Eval test Social Sciences", social), ("C-Eval test Humanities", humanities),
        ("C-Eval test Others", other)) if value is not None)


BASE = Table(
    "Qwen-7B (original) base model",
    "QwenLM/Qwen README.md (revisions 2023-08-03 to 2023-09-24) and tech_memo.md; spec 8.1",
    "Qwen-7B", "fewshot", (
        Row("MMLU 5-shot", 56.7, "mmlu", "acc_parity"),
        Row("MMLU STEM", 47.6, "mmlu", "acc_parity", "STEM"),
        Row("MMLU Social Sciences", 65.9, "mmlu", "acc_parity", "Social Sciences"),
        Row("MMLU Humanities", 51.5, "mmlu", "acc_parity", "Humanities"),
        Row("MMLU Others", 64.7, "mmlu", "acc_parity", "Other"),
        Row("C-Eval val 5-shot", 60.8, "ceval", "acc_parity"),
        Row("CMMLU 5-shot", 58.8, "cmmlu", "acc_parity",
            note="README since 2023-08-13 (PR #184); no category breakdown published"),
        Row("GSM8K 8-shot", 51.6, "gsm8k", "acc"),
        Row("HumanEval 0-shot pass@1", 24.4, "humaneval", "pass@1"),
        *_ceval_test(59.6, 41.0, 52.8, 74.1, 63.1, 55.2),
    ))

CHAT = Table(
    "Qwen-7B-Chat (original)",
    "QwenLM/Qwen tech_memo.md and the Qwen/Qwen-7B-Chat model card, 2023-08; spec 8.2",
    "Qwen-7B-Chat", "chat", (
        Row("C-Eval val 0-shot", 54.2, "ceval", "acc",
            note="scored with the 2023-08-03 extraction rules: run with --ceval-chat-rules 2023-08-03"),
        Row("MMLU 0-shot", 53.9, "mmlu", "acc"),
        Row("HumanEval 0-shot pass@1", 24.4, "humaneval", "pass@1",
            note="v0 prompt 'Help me fill the following code.'; the first memo draft said 21.3"),
        Row("GSM8K 0-shot", 41.1, "gsm8k", "acc"),
        Row("GSM8K 4-shot", 43.5, "gsm8k", "acc_4shot"),
        *_ceval_test(54.6, None, 47.8, 67.6, 59.3, 50.6),
    ))

INT4 = Table(
    "Qwen-7B-Chat BF16 vs GPTQ Int4",
    "QwenLM/Qwen README.md 'Quantization' section from 2023-08-21 (Qwen-7B-Chat-Int4, AutoGPTQ); spec 8.3",
    "Qwen-7B-Chat", "chat", (
        Row("BF16 MMLU", 53.9, "mmlu", "acc"),
        Row("BF16 C-Eval val", 54.2, "ceval", "acc"),
        Row("BF16 GSM8K", 41.1, "gsm8k", "acc"),
        Row("BF16 HumanEval", 24.4, "humaneval", "pass@1"),
        Row("Int4 MMLU", 52.6, "mmlu", "acc", model="Qwen-7B-Chat-Int4"),
        Row("Int4 C-Eval val", 52.9, "ceval", "acc", model="Qwen-7B-Chat-Int4"),
        Row("Int4 GSM8K", 38.1, "gsm8k", "acc", model="Qwen-7B-Chat-Int4"),
        Row("Int4 HumanEval", 23.8, "humaneval", "pass@1", model="Qwen-7B-Chat-Int4"),
    ))

PPL_LENGTHS = (1024, 2048, 4096, 8192, 16384)
PPL_REPORTED = {  # the long_ppl task's switch rows; the memo calls the window row "local_attn"
    "none": (4.23, 3.78, 39.35, 469.81, 2645.09),
    "dynamic_ntk": (4.23, 3.78, 3.59, 3.66, 5.71),
    "dynamic_ntk+logn": (4.23, 3.78, 3.58, 3.56, 4.62),
    "dynamic_ntk+logn+window": (4.23, 3.78, 3.58, 3.49, 4.32),
}
LONG_PPL = Table(
    "Qwen-7B (original) long-context perplexity on arXiv",
    "QwenLM/Qwen README.md and tech_memo.md long-context table, 2023-08; spec 8.5",
    "Qwen-7B", "fewshot",
    tuple(Row(f"{switches} @ {length}", value, "long_ppl", "ppl", (switches, length))
          for switches, values in PPL_REPORTED.items() for length, value in zip(PPL_LENGTHS, values)))

SPEED = Table(
    "Speed and peak memory, batch 1 (A100-SXM4-80G, PyTorch 2.0.1)",
    "QwenLM/Qwen README.md 'Quantization' section, revision of 2023-09-13 (Qwen-7B-Chat BF16 and Int4, "
    "1 context token, CUDA 11.4); spec 8.3",
    "Qwen-7B-Chat", None, (
        Row("BF16 generate 2048: tokens/s", 30.34, "profile", "generate/2048 tokens_per_s"),
        Row("BF16 generate 8192: tokens/s", 29.32, "profile", "generate/8192 tokens_per_s"),
        Row("BF16 encode 2048: peak GB", 17.66, "profile", "encode/2048 peak_gb"),
        Row("BF16 generate 8192: peak GB", 22.58, "profile", "generate/8192 peak_gb"),
        Row("Int4 generate 2048: tokens/s", 43.56, "profile", "generate/2048 tokens_per_s", model="Qwen-7B-Chat-Int4"),
        Row("Int4 generate 8192: tokens/s", 33.92, "profile", "generate/8192 tokens_per_s", model="Qwen-7B-Chat-Int4"),
        Row("Int4 encode 2048: peak GB", 8.21, "profile", "encode/2048 peak_gb", model="Qwen-7B-Chat-Int4"),
        Row("Int4 generate 8192: peak GB", 13.62, "profile", "generate/8192 peak_gb", model="Qwen-7B-Chat-Int4"),
    ))

# ---- Qwen-1.8B, -14B, -72B: the README of QwenLM/Qwen -------------------------------------------------------
README_REV = "QwenLM/Qwen README.md at 85cb093f"
CEVAL_SPLIT = "the README names no C-Eval split; measured on val, the split Qwen's evaluate_ceval.py scores"
CHAT_SHOTS = "the README's table names no shot count; Qwen's chat scripts are 0-shot"


def _family_base(size: str, model: str, mmlu, ceval, gsm8k, math_, humaneval, mbpp, bbh, cmmlu) -> Table:
    return Table(f"{model} base model", f"{README_REV}, 'Performance' table", model, "fewshot", (
        Row("MMLU 5-shot", mmlu, "mmlu", "acc_parity"),
        Row("C-Eval 5-shot", ceval, "ceval", "acc_parity", note=CEVAL_SPLIT),
        Row("CMMLU 5-shot", cmmlu, "cmmlu", "acc_parity"),
        Row("GSM8K 8-shot", gsm8k, "gsm8k", "acc"),
        Row("HumanEval 0-shot pass@1", humaneval, "humaneval", "pass@1"),
        Row("MATH 4-shot", math_, note="no MATH task in this harness"),
        Row("MBPP 3-shot", mbpp, note="no MBPP task in this harness"),
        Row("BBH 3-shot", bbh, note="no BBH task in this harness"),
    ), size)


def _family_chat(size: str, model: str, bf16: tuple, int4: tuple, tools: tuple) -> Table:
    """bf16, int4: (MMLU, C-Eval val, GSM8K, HumanEval); tools: (selection %, input Rouge-L, false positive %)."""
    measured = (("MMLU", "mmlu", "acc"), ("C-Eval val", "ceval", "acc"), ("GSM8K", "gsm8k", "acc"),
                ("HumanEval", "humaneval", "pass@1"))
    rows = [Row(f"{label}", value, task, metric, note=CHAT_SHOTS)
            for (label, task, metric), value in zip(measured, bf16)]
    rows += [Row(f"Int4 {label}", value, task, metric, model=f"{model}-Int4", note=CHAT_SHOTS)
             for (label, task, metric), value in zip(measured, int4)]
    note = "Chinese tool-use benchmark v20231206 (README 'Tool Usage'); run with --tooluse-version v20231206"
    rows += [Row("Tool selection", tools[0], "tooluse", "tool_selection", note=note),
             Row("Tool input Rouge-L", round(100 * tools[1], 1), "tooluse", "tool_input_rouge_l", note=note),
             Row("False positive", tools[2], "tooluse", "false_positive", note=note)]
    return Table(f"{model} (BF16 and GPTQ Int4)", f"{README_REV}, 'Quantization' (GPTQ) and 'Tool Usage' tables",
                 model, "chat", tuple(rows), size)


def _family_long(size: str, model: str, cells: dict[str, dict[int, float]]) -> Table:
    """Perplexity on arXiv per (long_ppl switch row, length); '-' cells of the README are left out."""
    rows = tuple(Row(f"{switches} @ {length}", value, "long_ppl", "ppl", (switches, length))
                 for switches, values in cells.items() for length, value in values.items())
    return Table(f"{model} long-context perplexity on arXiv", f"{README_REV}, 'Long-Context Understanding' table",
                 model, "fewshot", rows, size)


WINDOWED = "dynamic_ntk+logn+window"
FAMILY = {  # size -> its base, chat and long-context tables
    "1.8B": (_family_base("1.8B", "Qwen-1_8B", 45.3, 56.1, 32.3, 2.3, 15.2, 14.2, 22.3, 52.1),
             _family_chat("1.8B", "Qwen-1_8B-Chat", (43.3, 55.6, 33.7, 26.2), (42.9, 52.8, 31.2, 25.0),
                          (85.0, 0.839, 27.6)),
             _family_long("1.8B", "Qwen-1_8B", {
                 "none": {1024: 5.00, 2048: 4.48, 4096: 4.13, 8192: 3.89, 16384: 17.42, 32768: 433.85},
                 WINDOWED: {1024: 5.00, 2048: 4.48, 4096: 4.14, 8192: 3.93, 16384: 3.82, 32768: 3.83}})),
    "14B": (_family_base("14B", "Qwen-14B", 66.3, 72.1, 61.3, 24.8, 32.3, 40.8, 53.4, 71.0),
            _family_chat("14B", "Qwen-14B-Chat", (64.6, 69.8, 60.1, 43.9), (63.3, 69.0, 59.8, 45.7),
                         (96.9, 0.917, 5.6)),
            _family_long("14B", "Qwen-14B", {
                "none": {2048: 3.46, 4096: 22.79, 8192: 334.65, 16384: 3168.35},
                WINDOWED: {2048: 3.46, 4096: 3.29, 8192: 3.18, 16384: 3.42}})),
    "72B": (_family_base("72B", "Qwen-72B", 77.4, 83.3, 78.9, 35.2, 35.4, 52.2, 67.7, 83.6),
            _family_chat("72B", "Qwen-72B-Chat", (74.4, 80.1, 76.4, 64.6), (73.4, 80.1, 75.3, 61.6),
                         (98.2, 0.927, 1.1)),
            _family_long("72B", "Qwen-72B", {"none": {8192: 2.83, 16384: 2.73, 32768: 2.72}})),
}

TABLES = (BASE, CHAT, INT4, LONG_PPL, SPEED, *(table for tables in FAMILY.values() for table in tables))

# Tool use (spec 4.6, 8.2, 8.4), per data version; v1's 9.7% is the HF-version rerun this task follows (8.5% in
# the memo). Not in TABLES: the report has no tool-use table yet.
TOOLUSE = {"v20231206": {"tool_selection": 95.5, "tool_input_rouge_l": 90.0, "false_positive": 11.6},  # percent:
           "v1": {"tool_selection": 99.0, "tool_input_rouge_l": 89.0, "false_positive": 9.7}}  # Rouge-L 0.89 -> 89


def reported(task: str, mode: str, metric: str) -> float | None:
    """The published number of the original Qwen-7B (not a quantised one) for a task's whole-run metric."""
    return next((row.reported for table in TABLES if table.size == "7B" and table.mode in (None, mode)
                 for row in table.rows
                 if (row.task, row.metric, row.part, row.model) == (task, metric, None, "")), None)
