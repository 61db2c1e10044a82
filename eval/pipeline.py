"""One task run: plan (documents, requests, identity) -> serve -> records -> tables recomputed from the records.

Everything that can fail on user input (task, data, tokenizer, output directory) fails while
planning, before any model weight is loaded.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import api
from .api import Doc, Request, UserError, counted, stable_hash
from .cli_checks import check_subjects
from .distributed import SINGLE, Ranks, assign, doc_cost, log_to
from .stats import with_stderr
from .provenance import provenance, scorer_fingerprint
from .results import (Part, Record, Results, RunInfo, RunStore, Saved, append_lines, atomic_write, drop_shards,
                      read_info, read_results, read_samples, render_markdown, shard_path)

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
    data_manifest: dict = field(default_factory=dict)  # only this task's files
    timings: dict = field(default_factory=dict)  # seconds: load, plan (filled by the runner), then the rest
    environment: dict = field(default_factory=dict)  # added to the provenance (e.g. the sandbox's isolation)
    earlier_selection: list[str] = field(default_factory=list)  # the documents the saved table was made of

    @property
    def title(self) -> str:
        return f"{self.task.name} ({self.mode}) — {self.identity.get('model_name', '?')}"


def plan_task(task, mode: str, data, tok, *, subjects=None, limit=None, options=None, run_dir: Path) -> Plan:
    if mode not in task.modes:
        raise UserError(f"task {task.name} has no {mode!r} mode (modes: {', '.join(task.modes)})")
    reads = {*task.option_names, *(option.name for option in task.options)}
    options = {k: v for k, v in (options or {}).items() if k in reads}  # only what this task reads
    data = dataclasses.replace(data, files={}, skipped=[])  # this task's own files and skipped rows
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
    requests = _requests_of(task, docs, tok, mode, options)
    return Plan(task, mode, options, docs, requests, run_dir, data_manifest=data.manifest())


def _requests_of(task, docs: list[Doc], tok, mode: str, options: dict) -> list[list[Request]]:
    """task.requests of every document, in order, by a few threads over contiguous slices: tiktoken lets go
    of the GIL while it encodes (14,042 MMLU prompts of about 700 tokens each)."""
    workers = min(8, os.cpu_count() or 1)
    size = -(-len(docs) // (4 * workers))
    slices = [docs[i:i + size] for i in range(0, len(docs), size)]
    with ThreadPoolExecutor(workers) as pool:
        done = pool.map(lambda part: [task.requests(doc, tok, mode, options) for doc in part], slices)
        return [requests for part in done for requests in part]


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
            log=print) -> Results | None:
    """Serve what is not saved yet, append records as batches finish, then recompute the tables.

    One process, or one of N torchrun ranks: every rank serves its share of the unsaved documents
    (rank 0 appends to samples.jsonl, rank k to its shard), then rank 0 gathers the records and writes
    the run exactly as one process would. Returns the results on rank 0, None elsewhere.
    """
    if ranks.rank:
        log_to(plan.run_dir, ranks)
    hashes = {doc.doc_id: prompt_hash(reqs) for doc, reqs in zip(plan.docs, plan.requests)}
    ranks.same_everywhere(plan.task.name, stable_hash([hashes, plan.identity]))
    store = RunStore(plan.run_dir) if ranks.rank == 0 else None  # the directory's lock, held until it is written
    try:
        saved = None
        if store is not None:
            earlier = [] if overwrite or not (plan.run_dir / "run.json").exists() else read_info(plan.run_dir).planned
            plan.earlier_selection = earlier
            saved = store.claim(plan.identity, [d.doc_id for d in plan.docs], overwrite)
            _check_saved(saved, hashes, store)
        return _execute(plan, backend, ranks, store, saved, hashes, config, log)
    finally:
        if store is not None:
            store.close()


def _execute(plan: Plan, backend, ranks: Ranks, store, saved, hashes, config, log) -> Results | None:
    done, answered = ranks.share((sorted(saved.records), sorted(saved.parts)) if ranks.rank == 0 else None)
    answered = {(doc_id, j): saved.parts[doc_id, j].response for doc_id, j in answered} if ranks.rank == 0 else \
        _shard_parts(plan, ranks, answered)
    mine = _share(plan, ranks, set(done), log)
    sink = store.samples if ranks.rank == 0 else shard_path(plan.run_dir, ranks.rank)
    started, fresh = time.time(), []

    def on_items(items):
        append_lines(sink, items)
        fresh.extend(item for item in items if isinstance(item, Record))

    try:
        serve_docs(plan, backend, mine, hashes, answered, on_items)
    except KeyboardInterrupt:
        if ranks.world > 1:
            print(f"{plan.task.name}: rank {ranks.rank} interrupted; its finished records are saved (under torchrun "
                  f"no partial table is written): re-run the same command to resume")
            raise
        log(f"{plan.task.name}: interrupted; writing the partial table of the documents finished so far")
        saved.merge(read_samples(store.samples), str(store.samples))  # a record may have landed just before
        finish(plan, store, saved, fresh, config=config, served=time.time() - started)
        raise
    except Exception as err:
        if ranks.world > 1:  # the traceback follows on stderr (rank k: its log)
            where = f" (traceback in {plan.run_dir / f'rank{ranks.rank}.log'})" if ranks.rank else ""
            ranks.say(f"error: rank {ranks.rank} of {ranks.world} failed serving its share of {plan.task.name}: "
                      f"{type(err).__name__}: {err}{where}")
        raise
    ranks.wait_for_all(plan.task.name)
    gathered = ranks.gather(fresh)
    results = None
    if ranks.rank == 0:
        fresh = [record for part in gathered for record in part]
        for record in fresh:
            saved.add(record, plan.task.name)
        if ranks.world > 1:
            config = {**(config or {}), "world_size": ranks.world}
        results = finish(plan, store, saved, fresh, config=config, served=time.time() - started)
        drop_shards(plan.run_dir)  # samples.jsonl now holds every record the shards had
    ranks.barrier()  # samples.jsonl is complete: shards on disks rank 0 cannot see may go too
    shard_path(plan.run_dir, ranks.rank).unlink(missing_ok=True)
    return results


def _shard_parts(plan: Plan, ranks: Ranks, answered: list) -> dict:
    """Rank k: the responses saved for unfinished documents, as rank 0 read them (it sends only the keys,
    and every rank reads the run's files itself: they may be on a disk rank 0 cannot see)."""
    saved = read_samples(plan.run_dir / "samples.jsonl")
    saved.merge(read_samples(shard_path(plan.run_dir, ranks.rank), repair=True), plan.task.name)
    return {key: saved.parts[key].response for key in answered if key in saved.parts}


def _share(plan: Plan, ranks: Ranks, done: set, log) -> list[int]:
    """This rank's documents (indices into plan.docs) among those not saved yet."""
    todo = [k for k, doc in enumerate(plan.docs) if doc.doc_id not in done]
    if len(todo) < len(plan.docs) and todo:
        log(f"{plan.task.name}: resuming, {len(plan.docs) - len(todo)} of {counted(len(plan.docs), 'document')} "
            f"already done")
    if ranks.world == 1:
        return todo
    mine = [todo[i] for i in assign([doc_cost(plan.requests[k]) for k in todo], ranks.world)[ranks.rank]]
    log(f"{plan.task.name}: rank {ranks.rank} of {ranks.world} serves {len(mine)} of {len(todo)} documents "
        f"({sum(doc_cost(plan.requests[k]) for k in mine)} tokens)")
    return mine


def serve_docs(plan: Plan, backend, todo: list[int], hashes: dict, answered: dict, on_items) -> None:
    """Serve the requests of documents `todo` (indices into plan.docs) not `answered` yet (saved responses by
    (doc_id, request index)). on_items receives, per batch, a Record for each document it completes and a
    Part for each response of a document still waiting for others."""
    pending = {k: [response_from_json(answered[plan.docs[k].doc_id, j]) if (plan.docs[k].doc_id, j) in answered
                   else None for j in range(len(plan.requests[k]))] for k in todo}
    flat = [(k, j) for k in todo for j in range(len(plan.requests[k])) if pending[k][j] is None]
    ready = [k for k in todo if all(r is not None for r in pending[k])]  # every response saved, no record yet

    def save(ks: list[int], waiting: list[Part]) -> None:
        """Save `waiting` and the records of documents `ks`, whose responses are all in. Should scoring fail, their
        responses are saved instead (as parts), so that no generation is lost: a rerun scores them, no model work."""
        responses = {k: pending.pop(k) for k in ks}
        try:
            made = [make_record(plan, k, responses[k], hashes) for k in ks]
        except Exception as err:
            on_items([*waiting, *(Part(plan.docs[k].doc_id, j, hashes[plan.docs[k].doc_id], response_to_json(r))
                                  for k in ks for j, r in enumerate(responses[k]))])
            err.add_note(f"{plan.task.name}: scoring failed; every response is saved in {plan.run_dir}: "
                         f"run the same command again to score them without generating anew")
            raise
        on_items([*waiting, *made])

    if ready:
        save(ready, [])

    def on_done(done):
        finished, parts = [], []
        for index, response in done:
            k, j = flat[index]
            pending[k][j] = response
            parts.append((k, j))
        for k in dict.fromkeys(k for k, _ in parts):
            if all(r is not None for r in pending[k]):
                finished.append(k)
        waiting = [Part(plan.docs[k].doc_id, j, hashes[plan.docs[k].doc_id], response_to_json(pending[k][j]))
                   for k, j in parts if k not in finished]
        save(finished, waiting)

    plan.task.serve(backend, [plan.requests[k][j] for k, j in flat], on_done)


def _check_saved(saved: Saved, hashes: dict, store: RunStore) -> None:
    for doc_id, prompt in [*((r.doc_id, r.prompt_hash) for r in saved.records.values()),
                           *((p.doc_id, p.prompt_hash) for p in saved.parts.values())]:
        if doc_id in hashes and prompt != hashes[doc_id]:
            raise UserError(f"{store.samples}: the saved record of {doc_id} was made with a different prompt; "
                            f"use another --output-dir, or --overwrite to discard the old run")


def response_to_json(response) -> dict:
    return {"kind": type(response).__name__, **dataclasses.asdict(response)}


def response_from_json(obj: dict):
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in obj.items() if k != "kind"}
    return RESPONSE_KINDS[obj["kind"]](**fields)


def make_record(plan: Plan, k: int, responses: list, hashes: dict) -> Record:
    doc, requests = plan.docs[k], plan.requests[k]
    started = time.time()
    scores = plan.task.score(doc, responses, plan.mode, plan.options)
    plan.timings["score"] = plan.timings.get("score", 0.0) + time.time() - started
    return Record(doc.doc_id, doc.subject, hashes[doc.doc_id], len(requests[0].tokens),
                  any(r.truncated for r in requests), plan.task.record_fields(doc),
                  [response_to_json(r) for r in responses], scores)


def rederive(plan: Plan, saved: Saved, fresh: list[Record]) -> None:
    """Scores are derived, never trusted: every record not scored in this invocation is scored again from its
    raw responses, with this invocation's scorer."""
    planned = {doc.doc_id: doc for doc in plan.docs}
    made_now = {id(record) for record in fresh}
    started = time.time()
    for doc_id, record in saved.records.items():
        if id(record) not in made_now:
            doc = planned.get(doc_id) or Doc(doc_id, record.doc, record.subject)
            responses = [response_from_json(r) for r in record.responses]
            record.scores = plan.task.score(doc, responses, plan.mode, plan.options)
    plan.timings["score"] = plan.timings.get("score", 0.0) + time.time() - started


def finish(plan: Plan, store: RunStore, saved: Saved, fresh: list[Record], *, config: dict | None,
           served: float, rescoring: Results | None = None) -> Results:
    """Recompute the tables from every saved record of the plan's documents, write the run, show its table.

    `rescoring`: the results being re-scored, whose configuration, provenance and time are kept."""
    started = time.time()
    rederive(plan, saved, fresh)
    plan.timings["serve"] = max(0.0, served - plan.timings.get("score", 0.0))
    previous = rescoring or read_results(plan.run_dir)
    plan.timings["write"] = time.time() - started
    tabulated = tabulate(plan, saved, config, previous, rescoring=rescoring is not None)
    if rescoring is None and _narrower(plan, saved, previous):
        store.write_info(RunInfo(read_info(plan.run_dir).identity, plan.earlier_selection))
        show(plan, tabulated)
        print(f"{plan.task.name}: {plan.run_dir} keeps the table of its larger selection "
              f"({counted(previous.n_docs, 'document')}); this selection's table above is not saved")
        return tabulated.results
    write(store, tabulated)
    show(plan, tabulated)
    return tabulated.results


def _narrower(plan: Plan, saved: Saved, previous: Results | None) -> bool:
    """Whether the run's saved whole table covers every document of this selection and more (a smaller --limit):
    then the files keep the larger table rather than being replaced by this one."""
    earlier = set(plan.earlier_selection)
    planned = {d.doc_id for d in plan.docs}
    return (previous is not None and not previous.partial and len(earlier) > len(planned) and planned <= earlier
            and earlier <= set(saved.records))


@dataclass
class Tabulated:
    """A run's files as computed from its records, before anything is written."""

    results: Results
    title: str
    notes: list[str]
    items: list  # samples.jsonl in canonical order: it then does not depend on batching or resumes
    spent: dict  # this invocation's seconds


def tabulate(plan: Plan, saved: Saved, config: dict | None, previous: Results | None, *,
             rescoring: bool = False) -> Tabulated:
    """The run's results, table and canonical records from the saved records (pure: nothing is read or written)."""
    done_docs = [d for d in plan.docs if d.doc_id in saved.records]
    planned = {d.doc_id for d in plan.docs}
    others = [r for r in saved.records.values() if r.doc_id not in planned]  # another selection's: kept
    records = [saved.records[d.doc_id] for d in done_docs]
    parts = [p for p in saved.parts.values() if p.doc_id not in saved.records]
    scores = plan.task.aggregate(done_docs, [r.flat() for r in records], plan.mode, plan.options)
    partial = len(done_docs) < len(plan.docs)
    title = plan.title + (f" — PARTIAL: {len(done_docs)} of {len(plan.docs)} documents" if partial else "")
    timings = spent = {k: round(v, 2) for k, v in plan.timings.items()}
    if previous and not rescoring:  # a resumed run: the seconds of every invocation, as `seconds` sums them
        timings = {**previous.timings, **{k: round(previous.timings.get(k, 0.0) + v, 2) for k, v in spent.items()}}
    prompts = stable_hash(sorted(stable_hash([r.prompt for r in rs]) for rs in plan.requests))
    origin = {**provenance(plan.data_manifest, prompts), **plan.environment}
    seconds = (previous.seconds if previous else 0.0) + (0.0 if rescoring else sum(spent.values()))
    if rescoring:  # the run's own provenance and timings stay; this re-scoring is added to them
        origin = {**previous.provenance, "rescored": origin}
        timings = {**previous.timings, "rescore": timings}
        config = previous.config
    results = Results(plan.task.name, plan.mode, scores.metrics, partial, len(plan.docs), len(done_docs),
                      scores.table, scores.extra, plan.identity, config or {}, plan.options, origin, round(seconds, 2),
                      timings)
    notes = skipped_rows_notes(plan.data_manifest.get("skipped_rows") or []) + truncated_notes(records)
    return Tabulated(results, title, notes, [*records, *others, *parts], spent)


def write(store: RunStore, tabulated: Tabulated) -> None:
    store.rewrite(tabulated.items)
    store.finish(tabulated.results, tabulated.title, tabulated.notes)


def show(plan: Plan, tabulated: Tabulated) -> None:
    print(render_markdown(with_stderr(tabulated.results.table), tabulated.title, tabulated.notes))
    print(f"{plan.task.name}: seconds " + ", ".join(f"{k} {v:g}" for k, v in tabulated.spent.items()))


def truncated_notes(records: list[Record]) -> list[str]:
    """A line under the table when prompts were cut to fit the model's context (their scores are of less text)."""
    cut = sum(r.truncated for r in records)
    if not cut:
        return []
    return [f"{cut} of {counted(len(records), 'document')} had a prompt cut to fit the model's context "
            f"(truncated: true in samples.jsonl)"]


def skipped_rows_notes(skipped: list[str], shown: int = 10) -> list[str]:
    """Lines under the table for --skip-bad-rows: how many data rows were left out, and which."""
    if not skipped:
        return []
    more = [f"- ... and {len(skipped) - shown} more (results.json, provenance.data.skipped_rows)"]
    return ([f"{len(skipped)} bad data row(s) skipped (--skip-bad-rows):"] + [f"- {row}" for row in skipped[:shown]]
            + (more if len(skipped) > shown else []))


# ---- re-scoring ---------------------------------------------------------------------------------------
def rescore(run_dir: Path, get_task) -> Results:
    """Recompute every metric and table from saved records: no model, no data directory. The planned
    selection, `partial`, configuration and the original provenance are kept; this re-scoring is added."""
    info = read_info(run_dir)
    previous = read_results(run_dir)
    options = info.identity.get("options", {})
    task = _rescoring_task(get_task(info.identity["task"]), previous.config if previous else {}, options)
    store = RunStore(run_dir)
    try:
        saved = read_samples(store.samples, repair=True)
        if not saved.records:
            raise UserError(f"{store.samples}: no saved records to re-score")
        ids = info.planned or list(saved.records)
        docs = [Doc(i, saved.records[i].doc, saved.records[i].subject) if i in saved.records else Doc(i, {})
                for i in ids]
        identity = {**info.identity, "scorer": scorer_fingerprint(task)}  # the scorer the scores now come from
        store.write_info(RunInfo(identity, ids))
        plan = Plan(task, identity["mode"], options, docs, [[] for _ in docs], run_dir, identity,
                    previous.provenance.get("data", {}) if previous else {})
        return finish(plan, store, saved, [], config=None, served=0.0, rescoring=previous or _unwritten(plan))
    finally:
        store.close()


def _unwritten(plan: Plan) -> Results:
    """The results of a run killed before it wrote any: nothing to keep but its identity."""
    return Results(plan.task.name, plan.mode, {}, True, len(plan.docs), 0, api.Table([]), {}, plan.identity, {},
                   plan.options, {}, 0.0)


def _rescoring_task(task, config: dict, options: dict):
    """A task whose scoring needs the tokenizer (tooluse's Rouge-L) gets the run's, when it can be loaded;
    one whose binding needs the data directory (long_ppl) scores saved records unbound."""
    from .data import DataSource

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
