"""The small shared vocabulary of the harness: documents, the three request kinds, responses, errors.

Tasks turn documents into requests and responses into per-document records; backends serve lists of
requests. Neither side imports the other, and tasks never import torch.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol


class UserError(Exception):
    """A mistake in the command line, data or environment: reported without a traceback, exit code 2."""


@dataclass(frozen=True)
class Doc:
    doc_id: str  # e.g. "mmlu/anatomy/17", "gsm8k/5", "HumanEval/3"
    data: dict[str, Any]  # the task's own fields (question, options, gold, subject, ...)
    subject: str = ""


@dataclass(frozen=True)
class ChoiceRequest:
    """Next-token scores of a few candidate tokens after a prompt (multiple choice)."""

    prompt: str
    tokens: tuple[int, ...]
    choice_ids: tuple[int, ...]
    shared_prefix: int = 0  # leading tokens this request shares with others (the few-shot prefix)
    truncated: bool = False


@dataclass(frozen=True)
class GenerateRequest:
    """Greedy generation until a stop token, a stop rule or max_new_tokens.

    stop: groups of stop strings, searched in the generated text; generation ends once every group has
    matched (one group: "stop at the first of these"; two groups let one generation serve two cut rules).
    """

    prompt: str
    tokens: tuple[int, ...]
    max_new_tokens: int = 512
    stop: tuple[tuple[str, ...], ...] = ()
    stop_ids: tuple[int, ...] = ()
    shared_prefix: int = 0
    truncated: bool = False
    query: str | None = None  # chat mode: the user message
    temperature: float = 0.0  # 0: greedy; > 0: sampling, reproducible from `seed` whatever the batching
    seed: int = 0


@dataclass(frozen=True)
class LoglikelihoodRequest:
    """Summed next-token NLL over a token stream (every token but the first is predicted)."""

    prompt: str  # a short description for records; the tokens are the content
    tokens: tuple[int, ...]
    switches: tuple[tuple[str, Any], ...] = ()  # model switch overrides for this request (long_ppl rows)
    truncated: bool = False


Request = ChoiceRequest | GenerateRequest | LoglikelihoodRequest


@dataclass(frozen=True)
class ChoiceResponse:
    logits: tuple[float, ...]  # the choice tokens' logits, computed in fp32
    parity_probs: tuple[float, ...]  # the original's softmax of full-vocab softmax, in the model dtype
    top_in_choices: bool  # whether the full-vocabulary argmax is one of the choice tokens


@dataclass(frozen=True)
class GenerateResponse:
    tokens: tuple[int, ...]  # new tokens, stop token excluded
    text: str  # their decoding
    finish: str  # "stop" (stop token or rule) or "length"


@dataclass(frozen=True)
class LoglikelihoodResponse:
    nll: float
    n_tokens: int


@dataclass(frozen=True)
class ProfileResponse:
    """One request served alone, timed, with the device's peak memory (the `profile` task)."""

    seconds: float
    tokens: int  # generated tokens, or encoded tokens
    peak_memory_gb: float | None  # None on a CPU


Response = ChoiceResponse | GenerateResponse | LoglikelihoodResponse | ProfileResponse


class Backend(Protocol):
    tokenizer: Any
    name: str

    def choice(self, requests: list[ChoiceRequest], on_done=None) -> list[ChoiceResponse]: ...

    def generate(self, requests: list[GenerateRequest], on_done=None) -> list[GenerateResponse]: ...

    def loglikelihood(self, requests: list[LoglikelihoodRequest], on_done=None) -> list[LoglikelihoodResponse]: ...


def serve(backend: Backend, requests: list[Request], on_done=None) -> list[Response]:
    """Answer a mixed list of requests, grouped by kind, in input order.

    on_done, if given, receives (index, response) pairs as the backend finishes each batch.
    """
    out: list[Response | None] = [None] * len(requests)
    for kind, method in ((ChoiceRequest, backend.choice), (GenerateRequest, backend.generate),
                         (LoglikelihoodRequest, backend.loglikelihood)):
        idx = [i for i, r in enumerate(requests) if isinstance(r, kind)]
        if not idx:
            continue
        mapped = None if on_done is None else (lambda done, idx=idx: on_done([(idx[i], r) for i, r in done]))
        for i, resp in zip(idx, method([requests[i] for i in idx], on_done=mapped)):
            out[i] = resp
    return out


@dataclass
class Table:
    """A scored table: rows of (name, metrics); the first row is the headline."""

    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)


@dataclass
class Scores:
    metrics: dict[str, float]  # headline numbers, e.g. {"acc": 56.7}
    table: Table
    extra: dict[str, Any] = field(default_factory=dict)  # per-subject / per-category / counts


@dataclass(frozen=True)
class AccuracyScores:
    """How `compare` pairs two runs of an accuracy task: the headline metric and each document's score."""

    metric: str  # the results.json metric it gates on, e.g. "acc"
    score: Callable[[dict], float]  # a record -> its score in [0, 1] (a pass rate for several samples)
    averaging: str = "micro"  # or "macro": the mean of per-subject means
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)  # reported per group, not gated


@dataclass(frozen=True)
class PerplexityScores:
    """How `compare` pairs two runs of a perplexity task: per row, each document's summed NLL and tokens."""

    rows: Callable[[dict], tuple[str, ...]]  # the rows a record holds, in table order
    cell: Callable[[dict, str], tuple[float, int]]  # (record, row) -> (summed NLL, predicted tokens)
    length: Callable[[dict], int]  # a record's sample length (cells are reported per length)


@dataclass(frozen=True)
class Option:
    """A run option a task (or backend) reads, declared beside its code. The registry makes it a command-line
    flag (`flag`, or --<name with dashes>) and checks its value before any weight loads; the task's runs record it
    in their identity. default None: absent from the options unless given."""

    name: str  # the key in the options dict
    help: str
    type: Callable[[str], Any] = str  # bool: a switch (--flag, no value)
    default: Any = None
    choices: tuple = ()
    check: Callable[[Any], str | None] | None = None  # a value -> what is wrong with it, or None
    flag: str = ""
    metavar: str | None = None

    @property
    def flag_name(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        """The argparse destination (the flag's spelling, which may differ from the option's name)."""
        return self.flag_name[2:].replace("-", "_")

    def parse(self, raw: str) -> Any:
        """A flag's text as the option's value, checked; a mistake is one line naming the flag."""
        try:
            value = self.type(raw)
        except ValueError:
            expected = {int: "an integer", float: "a number"}.get(self.type) or self.type.__doc__
            raise UserError(f"{self.flag_name} {raw!r}: expected {expected}") from None
        self.validate(value, raw)
        return value

    def validate(self, value: Any, shown: str | None = None) -> None:
        why = self.check(value) if self.check and value is not None else None
        if why:
            raise UserError(f"{self.flag_name} {value if shown is None else shown}: {why}")


def comma_integers(text: str) -> list[int]:
    """comma-separated integers"""
    return [int(x) for x in text.split(",")]


def counted(n: int, noun: str) -> str:
    """'1 document', '2 documents'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def positive(value) -> str | None:
    """An Option check: numbers above zero."""
    return None if value > 0 else "expected a number above 0"


class Task:
    """Everything the harness asks of a benchmark; runner, pipeline, compare, report and plots name no task.

    A task sets name, modes and version and implements load, requests, score and aggregate; the rest
    has defaults that a task overrides where it differs.
    """

    name: str
    modes: tuple[str, ...]
    version: str  # bumped whenever prompts or scoring change; part of the run's identity
    subjects: list[str] | None = None  # what --subjects selects from; None: the task has no subjects
    executes_code = False  # runs model-written code: needs the opt-in; its runs record the sandbox's isolation
    timed = False  # each request served alone and timed (profile): never batched, never under torchrun
    sets_switches = False  # sets the model switches per request (long_ppl): --window-attn is an option, not a run
    option_names: tuple[str, ...] = ()  # the general run settings it reads (verbatim_csv, window_attn)
    options: tuple[Option, ...] = ()  # its own options: command-line flags, part of its runs' identity
    unrecorded_fields: tuple[str, ...] = ()  # document fields its records leave out (a prefix every record repeats)
    published_options: dict[str, dict] = {}  # "<size> <mode>" -> the option values its published number used (suites)

    def check_options(self, options: dict, mode: str) -> dict:
        """The options a run records, from its own options' values (defaults filled in); a task whose options
        depend on each other checks them here, raising a UserError that names the flags."""
        return options

    def serve(self, backend: Any, requests: list, on_done=None) -> list:
        """Answer the requests (a mixed list) batched; a task that must be served otherwise overrides this."""
        return serve(backend, requests, on_done)

    def record_fields(self, doc: Doc) -> dict:
        """The document's fields saved in its record: all but `unrecorded_fields`."""
        return {key: value for key, value in doc.data.items() if key not in self.unrecorded_fields}

    def bind(self, data: Any, tok: Any, options: dict) -> "Task":
        """This task over one data directory and tokenizer, for tasks whose documents depend on them."""
        return self

    def load(self, data: Any, mode: str, subjects: list[str] | None = None) -> list[Doc]:
        raise NotImplementedError

    def requests(self, doc: Doc, tok: Any, mode: str, options: dict) -> list[Request]:
        raise NotImplementedError

    def score(self, doc: Doc, responses: list[Response], mode: str, options: dict) -> dict:
        raise NotImplementedError

    def aggregate(self, docs: list[Doc], records: list[dict], mode: str, options: dict) -> Scores:
        raise NotImplementedError

    def paired_scores(self, mode: str) -> AccuracyScores | PerplexityScores | None:
        """Per-document scores for `compare`; None: nothing to compare document by document."""
        return None

    def plot(self, results: dict, run_dir: Any) -> list:
        """PNG plots of a finished run, written into run_dir (eval/plots.py draws them); none by default."""
        return []


# ---- what several tasks build the same way ----------------------------------------------------------
def chat_request(tok: Any, query: str, **fields) -> GenerateRequest:
    """One ChatML user turn (default system prompt), stopping at <|im_end|>/<|im_start|>; greedy, 512 new tokens
    unless `fields` say otherwise."""
    raw, ids = tok.make_context(query)
    return GenerateRequest(raw, tuple(ids), **{"max_new_tokens": 512, "stop_ids": tok.chat_stop_ids, "query": query,
                                               **fields})


def shared_prefix_length(ids: Sequence[int], prefix: Sequence[int]) -> int:
    """Leading tokens a prompt shares with its tokenized few-shot prefix (fewer when the seam merges tokens).

    Found by bisection on list slices, compared in C: a full MMLU plan asks 14,042 times about ~600 tokens
    (1.9 s element by element)."""
    ids, prefix = list(ids), list(prefix)
    n = min(len(ids), len(prefix))
    if ids[:n] == prefix[:n]:  # the usual case: the whole prefix
        return n
    agree, differ = 0, n  # ids[:agree] == prefix[:agree]; not so at differ
    while differ - agree > 1:
        middle = (agree + differ) // 2
        if ids[:middle] == prefix[:middle]:
            agree = middle
        else:
            differ = middle
    return agree


def cut_at_each(text: str, cuts: tuple[str, ...]) -> str:
    """The original scripts' truncation: keep what precedes each cut string in turn."""
    for cut in cuts:
        text = text.split(cut)[0]
    return text


def stable_hash(obj: Any) -> str:
    """A short content hash of JSON-able data (prompts, configs), stable across runs and machines."""
    blob = obj if isinstance(obj, (bytes, str)) else json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    data = blob.encode() if isinstance(blob, str) else blob
    return hashlib.sha256(data).hexdigest()[:16]
