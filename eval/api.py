"""The small shared vocabulary of the harness: documents, the three request kinds, responses, errors.

Tasks turn documents into requests and responses into per-document records; backends serve lists of
requests. Neither side imports the other, and tasks never import torch.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Protocol


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


class Task(Protocol):
    name: str
    modes: tuple[str, ...]
    version: str  # bumped whenever prompts or scoring change; part of the run's identity

    def load(self, data: Any, mode: str, subjects: list[str] | None = None) -> list[Doc]: ...

    def requests(self, doc: Doc, tok: Any, mode: str, options: dict) -> list[Request]: ...

    def score(self, doc: Doc, responses: list[Response], mode: str, options: dict) -> dict: ...

    def aggregate(self, docs: list[Doc], records: list[dict], mode: str, options: dict) -> Scores: ...


def stable_hash(obj: Any) -> str:
    """A short content hash of JSON-able data (prompts, configs), stable across runs and machines."""
    blob = obj if isinstance(obj, (bytes, str)) else json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    data = blob.encode() if isinstance(blob, str) else blob
    return hashlib.sha256(data).hexdigest()[:16]
