"""Tool use (ReAct) without a model: parsing quirks, the three metrics, data errors, a pipeline run."""
import json

import pytest

from fixtures import OracleBackend
from eval.api import GenerateResponse, UserError
from eval.backends import stop_rules_met
from eval.data import DataSource
from eval.pipeline import execute, plan_task
from eval.tasks import tooluse

TOOLS = {"web_search": "Search the web. Parameters: [{\"name\": \"query\", \"type\": \"string\"}]",
         "image_gen": "Draw a picture. Parameters: [{\"name\": \"prompt\", \"type\": \"string\"}, "
                      "{\"name\": \"size\", \"type\": \"integer\"}]",
         "calculator": "Evaluate arithmetic. Parameters: [{\"name\": \"expression\", \"type\": \"string\"}]"}
POSITIVE = [("What is the weather in Beijing?", "web_search", {"query": "Beijing weather today"}),
            ("画一只猫", "image_gen", {"prompt": "一只可爱的猫", "size": 512}),
            ("What is 17 * 23?", "calculator", {"expression": "17 * 23"})]
NEGATIVE = [("Hello, who are you?", "I am a helpful assistant."), ("Tell me a joke.", "Why did the chicken cross?")]


def react_prompt(question: str) -> str:
    tools = "\n\n".join(f"{name}: {text} Format the arguments as a JSON object." for name, text in TOOLS.items())
    return (f"Answer the following questions as best you can. You have access to the following tools:\n\n{tools}\n\n"
            f"Use the following format:\n\nQuestion: the input question you must answer\nThought: ...\n"
            f"Action: the action to take, should be one of [{','.join(TOOLS)}]\nAction Input: the input to the action\n"
            f"Observation: the result of the action\n...\nFinal Answer: the final answer\n\nBegin!\n\nQuestion: {question}")


def call(action: str, args: dict, tail: str = "\nObservation:") -> str:
    return f"Thought: I should use {action}.\nAction: {action}\nAction Input: {json.dumps(args, ensure_ascii=False)}{tail}"


def write_jobs(root, version="v20231206"):
    folder = root / "tooluse"
    folder.mkdir(parents=True, exist_ok=True)
    tails = ["\nObservation:", "", "\nObservation: 391\nThought: I now know.\nFinal Answer: 391"]
    positive = [{"prompt": react_prompt(q), "response": call(a, args, tail)} for (q, a, args), tail in zip(POSITIVE, tails)]
    negative = [{"prompt": react_prompt(q), "response": f"Thought: No tool is needed.\nFinal Answer: {a}"} for q, a in NEGATIVE]
    for name, jobs in (("positive", positive), ("negative", negative)):
        lines = "".join(json.dumps(job, ensure_ascii=False) + "\n" for job in jobs)
        (folder / tooluse.FILE.format(version=version, set=name)).write_text(lines, encoding="utf-8")
    return root


@pytest.fixture
def root(tmp_path):
    return write_jobs(tmp_path)




def run(root, tok, answer_for, subjects=None):
    """load -> requests -> backend -> score -> aggregate, as the pipeline drives a bound task."""
    task = tooluse.TASK.bind(DataSource(root), tok, {})
    docs = task.load(DataSource(root), "chat", subjects)
    records = []
    for doc in docs:
        responses = OracleBackend(lambda r, doc=doc: answer_for(doc, r)).generate(task.requests(doc, tok, "chat", {}))
        records.append(task.score(doc, responses, "chat", {}))
    json.dumps(records)  # records must be JSON as written to samples.jsonl
    return task.aggregate(docs, records, "chat", {})


def gold(doc, request):
    return doc.data["response"]


# ---- requests and scoring -------------------------------------------------------------------------
def test_requests_are_chatml_turns_stopping_at_observation(root, tok):
    task = tooluse.TASK.bind(DataSource(root), tok, {})
    docs = task.load(DataSource(root), "chat")
    assert [d.doc_id for d in docs] == ["tooluse/positive/0", "tooluse/positive/1", "tooluse/positive/2",
                                        "tooluse/negative/0", "tooluse/negative/1"]
    assert [d.subject for d in docs] == ["positive"] * 3 + ["negative"] * 2
    (request,) = task.requests(docs[0], tok, "chat", {})
    assert request.query == docs[0].data["prompt"] and (request.prompt, list(request.tokens)) == tok.make_context(request.query)
    assert (request.max_new_tokens, request.stop, request.stop_ids) == (512, (("Observation:",),), tok.chat_stop_ids)


def test_oracle_scores_100_and_0_every_metric_in_percent(root, tok):
    scores = run(root, tok, gold)
    assert scores.metrics == {"tool_selection": 100.0, "tool_input_rouge_l": 100.0, "false_positive": 0.0}
    assert scores.table.rows == [["Tool Selection (%)", "v20231206 positive", 3, 100.0, 95.5],
                                 ["Tool Input Rouge-L F1 (%)", "v20231206 positive", 3, 100.0, 90.0],
                                 ["False Positive (%)", "v20231206 negative", 2, 0.0, 11.6]]


def test_always_calling_a_tool_is_all_false_positives(root, tok):
    scores = run(root, tok, lambda doc, r: call("web_search", {"query": "anything"}))
    assert scores.metrics["false_positive"] == 100.0
    assert scores.metrics["tool_selection"] == pytest.approx(100 / 3)  # right only where web_search is the gold
    assert 0 < scores.metrics["tool_input_rouge_l"] < 100  # percent, as every other metric


def test_rouge_is_over_qwen_tokens_and_ignores_key_order_and_quoting(root, tok):
    task = tooluse.TASK.bind(DataSource(root), tok, {})
    gold_input = tooluse.normalise_input('{"prompt": "一只可爱的猫", "size": 512}')
    assert task.rouge_l(tooluse.normalise_input("{size: 512, 'prompt': '一只可爱的猫',}"), gold_input) == 1.0
    assert tooluse.token_string(tok, gold_input) == " ".join(tok.decode([i]) for i in tok.encode(gold_input))
    half = task.rouge_l(tooluse.normalise_input('{"prompt": "一只猫", "size": 512}'), gold_input)
    assert 0.5 < half < 1
    # a token holding part of a character decodes to U+FFFD (errors="replace", as the original), so two rare
    # characters split into byte tokens compare equal
    assert tooluse.token_string(tok, "龘") == tooluse.token_string(tok, "𝔘") == "\ufffd \ufffd"
    assert task.rouge_l("", gold_input) == 0.0  # unparseable input: "" against the gold


def test_stopping_at_observation_parses_the_same(tok):
    full = call("calculator", {"expression": "2+2"}, "\nObservation: 4\nThought: done\nAction: calculator\nFinal Answer: 4")
    stopped = full[: next(i for i in range(len(full) + 1) if stop_rules_met((("Observation:",),), full[:i]))]
    assert {k: tooluse.parse(stopped)[k] for k in ("action", "action_input")} == \
           {k: tooluse.parse(full)[k] for k in ("action", "action_input")}


# ---- parsing (the original's process_res, quirks included) ----------------------------------------
def test_parse_a_full_react_turn():
    parsed = tooluse.parse("Thought: look it up\nAction: web_search\nAction Input: {\"query\": \"x\"}\n"
                           "Observation: found\nThought: I now know\nFinal Answer: x is y")
    assert parsed == {"thought": "Thought: look it up", "action": "web_search", "action_input": '{"query": "x"}',
                      "observation": "found", "thought_last": "I now know", "final_answer": "x is y"}


def test_final_answer_without_an_action(root, tok):
    text = "Thought: no tool needed\nFinal Answer: hello"
    parsed = tooluse.parse(text)
    assert parsed["final_answer"] == "hello" and parsed["action_input"] == ""
    assert parsed["action"] == text[6:]  # find() == -1 slices [6:-1] of text + "\n": the original's quirk
    task = tooluse.TASK.bind(DataSource(root), tok, {})
    positive, negative = task.load(DataSource(root), "chat")[0], task.load(DataSource(root), "chat")[-1]
    assert task.score(positive, [GenerateResponse((), text, "stop")], "chat", {})["correct"] is False
    assert task.score(negative, [GenerateResponse((), text, "stop")], "chat", {}) == \
           {"response": text, "called": False, "correct": True}


def test_missing_action_input(root, tok):
    parsed = tooluse.parse("Thought: t\nAction: web_search\nObservation:")
    assert parsed["action"] == "web_search\nObservation:"  # sliced up to find("Action Input:") == -1
    assert parsed["action_input"] == ""
    task = tooluse.TASK.bind(DataSource(root), tok, {})
    doc = task.load(DataSource(root), "chat")[0]
    record = task.score(doc, [GenerateResponse((), "Thought: t\nAction: web_search\nObservation:", "stop")], "chat", {})
    assert record["called"] and not record["correct"] and record["rouge_l"] == 0.0


@pytest.mark.parametrize("text,action,called", [
    ("Thought: t\nAction:web_search\nAction Input: {}", "web_search", False),  # no space after the colon
    ("Action: web_search\nAction Input: {}", "web_search", False),  # no newline before Action
    ("Thought: t\nAction:  Web_Search \nAction Input: {}", "Web_Search", True),  # case and spaces do not matter
    ("Thought: t\nAction: web_search Action Input: {}", "web_search", True),
])
def test_malformed_actions(root, tok, text, action, called):
    assert tooluse.parse(text)["action"] == action
    task = tooluse.TASK.bind(DataSource(root), tok, {})
    record = task.score(task.load(DataSource(root), "chat")[0], [GenerateResponse((), text, "stop")], "chat", {})
    assert (record["called"], record["correct"]) == (called, called)


@pytest.mark.parametrize("raw,normalised", [
    ('{"b": 1, "a": "猫"}', '{"a": "猫", "b": 1}'),
    ("{a: 1, 'b': [1, 2,],}", '{"a": 1, "b": [1, 2]}'),  # json5: bare keys, single quotes, trailing commas
    ("Beijing weather", ""), ("{\"query\": \"x\"", ""), ("", ""), ("calc(1+1)", ""),
    ("42", "42"), ('"just a string"', '"just a string"'),  # JSON, if not an object
])
def test_action_input_normalisation(raw, normalised):
    assert tooluse.normalise_input(raw) == normalised
    assert tooluse.parse(f"Action: f\nAction Input: {raw}\nObservation:")["action_input"] == normalised


# ---- data -----------------------------------------------------------------------------------------
def test_missing_data_names_the_expected_files(tmp_path, tok):
    with pytest.raises(UserError, match=r"tooluse/exam_plugin_v20231206_react_positive\.jsonl and .*"
                                        r"v20231206_react_negative\.jsonl, or .*exam_plugin_v1_react_positive\.jsonl"):
        plan_task(tooluse.TASK, "chat", DataSource(tmp_path), tok, run_dir=tmp_path / "run")
    with pytest.raises(UserError, match="not on the Hugging Face hub; pass --data-dir"):
        tooluse.TASK.load(DataSource(None), "chat")
    with pytest.raises(UserError, match="no 'fewshot' mode"):
        plan_task(tooluse.TASK, "fewshot", DataSource(tmp_path), tok, run_dir=tmp_path / "run")


def test_data_versions(tmp_path, tok):
    write_jobs(tmp_path, "v1")
    assert tooluse.TASK.load(DataSource(tmp_path), "chat")[0].data["version"] == "v1"
    write_jobs(tmp_path, "v20231206")
    assert tooluse.TASK.load(DataSource(tmp_path), "chat")[0].data["version"] == "v20231206"  # newer by default
    v1 = tooluse.TASK.bind(DataSource(tmp_path), tok, {"tooluse_version": "v1"})
    assert v1.load(DataSource(tmp_path), "chat")[0].data["version"] == "v1"
    with pytest.raises(UserError, match="expected one of v20231206, v1"):
        tooluse.TASK.bind(DataSource(tmp_path), tok, {"tooluse_version": "v2"}).load(DataSource(tmp_path), "chat")


def test_one_set_alone(tmp_path, tok):
    write_jobs(tmp_path)
    (tmp_path / "tooluse" / "exam_plugin_v20231206_react_positive.jsonl").unlink()
    scores = run(tmp_path, tok, gold, subjects=["negative"])
    assert scores.metrics == {"false_positive": 0.0} and len(scores.table.rows) == 1


def test_bad_lines_name_the_file_and_line(root):
    path = root / "tooluse" / "exam_plugin_v20231206_react_positive.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join([lines[0], json.dumps({"prompt": "no gold"}), lines[2]]) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"react_positive\.jsonl:2: expected a JSON object with string prompt and response"):
        tooluse.TASK.load(DataSource(root), "chat")
    data = DataSource(root, skip_bad_rows=True)
    assert [d.doc_id for d in tooluse.TASK.load(data, "chat", ["positive"])] == ["tooluse/positive/0", "tooluse/positive/2"]


# ---- pipeline ---------------------------------------------------------------------------------------
def test_pipeline_run_and_resume(root, tok, tmp_path):
    answers = {json.loads(line)["prompt"]: json.loads(line)["response"]
               for line in (root / "tooluse" / "exam_plugin_v20231206_react_positive.jsonl").read_text().splitlines()}
    oracle = OracleBackend(lambda r: answers.get(r.query, "Thought: no tool\nFinal Answer: hi"))
    plan = plan_task(tooluse.TASK, "chat", DataSource(root), tok, run_dir=tmp_path / "run")
    results = execute(plan, oracle, config={}, log=lambda *_: None)
    assert results.metrics == {"tool_selection": 100.0, "tool_input_rouge_l": 100.0, "false_positive": 0.0}
    records = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 5 and all(r["correct"] for r in records)
    assert records[0]["gold_action"] == "web_search" and records[0]["subject"] == "positive"
    again = OracleBackend(oracle.answer_for)
    plan = plan_task(tooluse.TASK, "chat", DataSource(root), tok, run_dir=tmp_path / "run")
    assert execute(plan, again, config={}, log=lambda *_: None).metrics == results.metrics and again.served == 0
