"""Named suites expand to the runs behind the published tables."""
from eval.suites import SUITES, Entry, expand


def test_base_and_chat_suites_are_the_readme_tables():
    assert [(e.task, e.mode) for e in SUITES["qwen-7b-base"]] == [
        ("mmlu", "fewshot"), ("ceval", "fewshot"), ("cmmlu", "fewshot"), ("gsm8k", "fewshot"), ("humaneval", "fewshot")]
    assert [(e.task, e.mode) for e in SUITES["qwen-7b-chat"]] == [
        ("ceval", "chat"), ("mmlu", "chat"), ("humaneval", "chat"), ("gsm8k", "chat")]
    assert Entry("ceval", "chat") in SUITES["qwen-7b-chat"]  # flags do not take part in equality
    assert next(e for e in SUITES["qwen-7b-chat"] if e.task == "ceval").flags == {"ceval_chat_rules": "2023-08-03"}


def test_all_holds_both_tables_long_context_and_tool_use():
    pairs = {(e.task, e.mode) for e in SUITES["all"]}
    assert pairs >= {(e.task, e.mode) for e in SUITES["qwen-7b-base"] + SUITES["qwen-7b-chat"]}
    assert {("long_ppl", "fewshot"), ("tooluse", "chat")} <= pairs and len(pairs) == len(SUITES["all"])


def test_expand_mixes_suites_and_tasks_without_repeats():
    entries = expand(["gsm8k", "qwen-7b-base", "long_ppl"], "fewshot")
    assert [e.task for e in entries] == ["gsm8k", "mmlu", "ceval", "cmmlu", "humaneval", "long_ppl"]
    assert [(e.task, e.mode) for e in expand(["mmlu"], "chat")] == [("mmlu", "chat")]
