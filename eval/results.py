"""A run's directory: its schema (run.json, records, results.json), the one reader and the one writer.

    results/<model>/<task>-<mode>[-<switches>]/
        run.json        RunInfo: what determines the numbers (model weights, tokenizer, data, scorer, ...)
        samples.jsonl   one Record per document (raw model outputs, derived scores, a checksum), and a
                        Part per response of a document not finished yet; appended and fsynced per batch
        results.json    Results: metrics and tables recomputed from the records, configuration, provenance
        table.md, table.csv
        .lock           the writer's advisory lock (one writer per directory), holding its pid

A run killed at any moment loses at most the batch in flight; a torn last line is dropped with a
warning. A record whose checksum does not match, two different records of one document, or a line
that is no record is an error naming the file and line.
"""
from __future__ import annotations

import csv
import dataclasses
import fcntl
import functools
import io
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .api import Table, UserError, stable_hash
from .stats import with_stderr

SHARD_GLOB = "samples.rank*.jsonl"  # a torchrun job's rank k appends to samples.rank<k>.jsonl
RECORD_FIELDS = ("doc_id", "subject", "prompt_hash", "n_tokens", "truncated", "doc", "responses")


# ---- the schema ----------------------------------------------------------------------------------------
@dataclass
class RunInfo:
    """run.json. `identity` must match for a run to resume; `planned` is the latest invocation's selection."""

    identity: dict
    planned: list[str] = field(default_factory=list)  # doc ids, in plan order

    @classmethod
    def parse(cls, obj: Any, where: Path) -> "RunInfo":
        if not (isinstance(obj, dict) and isinstance(obj.get("identity"), dict)
                and isinstance(obj.get("planned", []), list)):
            raise UserError(f"{where}: not a run.json of this harness (needs an 'identity' object)")
        return cls(obj["identity"], obj.get("planned", []))


@dataclass
class Record:
    """One document: its raw model outputs, and the scores the task derives from them."""

    doc_id: str
    subject: str
    prompt_hash: str
    n_tokens: int
    truncated: bool
    doc: dict
    responses: list[dict]  # {"kind": ResponseClassName, **fields}: what the model produced
    scores: dict  # task.score(doc, responses): recomputed from `responses` at the end of every invocation
    _line: tuple | None = field(default=None, init=False, repr=False, compare=False)  # (scores, line)

    def flat(self) -> dict:
        """The record as tasks, compare and report read it: the fields, then the scores, in one dict."""
        return {**{name: getattr(self, name) for name in RECORD_FIELDS}, **self.scores}

    def line(self) -> str:
        """Its samples.jsonl line. Kept, since a run writes each record twice (as it finishes, then in canonical
        order; 1.5 s of a full MMLU run), for as long as `scores` is the same dict: a re-score assigns a new one."""
        if self._line is None or self._line[0] is not self.scores:
            flat = self.flat()
            text = json.dumps({**flat, "checksum": stable_hash(flat)}, ensure_ascii=False, sort_keys=True) + "\n"
            self._line = (self.scores, text)
        return self._line[1]

    @classmethod
    def parse(cls, obj: dict, where: str) -> "Record":
        body = {k: v for k, v in obj.items() if k != "checksum"}
        if "checksum" not in obj:
            raise UserError(f"{where}: a record without a checksum (written before records had one): run into "
                            f"another --output-dir, or pass --overwrite")
        if obj["checksum"] != stable_hash(body):
            raise UserError(f"{where}: the record of {obj.get('doc_id')} was changed after it was written (checksum "
                            f"mismatch); delete that line to recompute the document, or pass --overwrite")
        missing = [name for name in RECORD_FIELDS if name not in body]
        if missing:
            raise UserError(f"{where}: not a record (no {', '.join(missing)})")
        return cls(**{name: body.pop(name) for name in RECORD_FIELDS}, scores=body)


@dataclass
class Part:
    """One response of a document whose other responses are not all served yet (e.g. one long_ppl row)."""

    doc_id: str
    index: int  # which of the document's requests
    prompt_hash: str
    response: dict

    def line(self) -> str:
        body = {"part": self.index, "doc_id": self.doc_id, "prompt_hash": self.prompt_hash, "response": self.response}
        return json.dumps({**body, "checksum": stable_hash(body)}, ensure_ascii=False, sort_keys=True) + "\n"

    @classmethod
    def parse(cls, obj: dict, where: str) -> "Part":
        body = {k: v for k, v in obj.items() if k != "checksum"}
        if obj.get("checksum") != stable_hash(body) or set(body) != {"part", "doc_id", "prompt_hash", "response"}:
            raise UserError(f"{where}: a changed or malformed response line of {obj.get('doc_id')}; delete that line "
                            f"to recompute it, or pass --overwrite")
        return cls(body["doc_id"], body["part"], body["prompt_hash"], body["response"])


@dataclass
class Results:
    """results.json: everything in it is recomputed from the records when an invocation ends."""

    task: str
    mode: str
    metrics: dict
    partial: bool  # some planned document has no record
    n_docs: int  # planned documents
    n_done: int
    table: Table
    details: dict
    identity: dict
    config: dict
    options: dict
    provenance: dict
    seconds: float  # summed over every invocation that worked on the run
    timings: dict = field(default_factory=dict)  # where this invocation's time went, in seconds

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, ensure_ascii=False, default=str)

    @classmethod
    def parse(cls, obj: Any, where: Path) -> "Results":
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(obj, dict) or not all(name in obj for name in names if name != "timings"):
            raise UserError(f"{where}: not a results.json of this harness")
        table = obj["table"]
        return cls(**{**{k: obj[k] for k in names if k in obj}, "table": Table(table["columns"], table["rows"])})


# ---- reading ---------------------------------------------------------------------------------------------
@dataclass
class Saved:
    """What a records file holds: finished documents, and responses of unfinished ones."""

    records: dict[str, Record] = field(default_factory=dict)
    parts: dict[tuple[str, int], Part] = field(default_factory=dict)

    def add(self, item: Record | Part, where: str) -> None:
        if isinstance(item, Part):
            self.parts.setdefault((item.doc_id, item.index), item)
            return
        old = self.records.get(item.doc_id)
        if old is not None and old.responses != item.responses:
            raise UserError(f"{where}: a second, different record of {item.doc_id}; delete the wrong line, or pass "
                            f"--overwrite")
        self.records[item.doc_id] = item

    def merge(self, other: "Saved", where: str) -> None:
        for item in [*other.records.values(), *other.parts.values()]:
            self.add(item, where)


def parse_line(raw: bytes, where: str) -> Record | Part:
    obj = json.loads(raw)
    if not isinstance(obj, dict):
        raise UserError(f"{where}: not a record (a JSON {type(obj).__name__})")
    return Part.parse(obj, where) if "part" in obj else Record.parse(obj, where)


def read_samples(path: Path, *, repair: bool = False) -> Saved:
    """The records of a samples file. A torn last line (a run killed mid-append) is left out; with `repair`
    (the writer) it is also cut off, with a warning."""
    saved = Saved()
    if not path.exists():
        return saved
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    good_bytes = 0
    for number, raw in enumerate(lines, 1):
        try:
            item = parse_line(raw, f"{path}:{number}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            if number == len(lines) and not tail:
                tail = raw
                break
            raise UserError(f"{path}:{number}: corrupt record in the middle of the file") from None
        saved.add(item, f"{path}:{number}")
        good_bytes += len(raw) + 1
    if tail and repair:
        warnings.warn(f"{path}: dropped a torn last line ({len(tail)} bytes) left by an interrupted run")
        try:
            with open(path, "r+b") as f:
                f.truncate(good_bytes)
        except OSError as err:
            raise UserError(f"{path}: cannot cut its torn last line ({err.strerror})") from None
    return saved


def read_info(run_dir: Path) -> RunInfo:
    path = run_dir / "run.json"
    try:
        return RunInfo.parse(json.loads(path.read_text(encoding="utf-8")), path)
    except FileNotFoundError:
        raise UserError(f"{run_dir} is not a run directory (no run.json)") from None
    except (OSError, ValueError):
        raise UserError(f"{path} is unreadable") from None


def read_results(run_dir: Path) -> Results | None:
    """results.json, or None when the run has none yet."""
    path = run_dir / "results.json"
    try:
        return Results.parse(json.loads(path.read_text(encoding="utf-8")), path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        raise UserError(f"{path} is unreadable") from None


def read_run_records(run_dir: Path) -> Saved:
    """samples.jsonl and the shards an unfinished torchrun job left, read-only."""
    saved = read_samples(run_dir / "samples.jsonl")
    for path in sorted(run_dir.glob(SHARD_GLOB)):
        saved.merge(read_samples(path), str(path))
    return saved


@dataclass
class Run:
    """A run directory as `report` and `compare` read it (they never write one)."""

    dir: Path
    identity: dict
    results: Results | None  # None until an invocation has finished

    @property
    def task(self) -> str:
        return self.identity.get("task", "?")

    @property
    def mode(self) -> str:
        return self.identity.get("mode", "?")

    @property
    def model_name(self) -> str:
        return self.identity.get("model_name") or self.dir.parent.name

    @property
    def finished(self) -> bool:
        return self.results is not None and not self.results.partial

    @functools.cached_property
    def records(self) -> dict[str, dict]:
        """Each document's record as tasks read it (Record.flat), by doc_id in file order; read on first use."""
        return {doc_id: record.flat() for doc_id, record in read_run_records(self.dir).records.items()}


def read_run(run_dir: Path) -> Run:
    """The run in run_dir. Its identity is run.json's (the data files of every invocation), or results.json's
    for a table kept without its records (results/reference/)."""
    results = read_results(run_dir)
    if results is not None and not (run_dir / "run.json").exists():
        return Run(run_dir, results.identity, results)
    return Run(run_dir, read_info(run_dir).identity, results)


# ---- writing ---------------------------------------------------------------------------------------------
def atomic_write(path: Path, content: str | bytes) -> None:
    """Write via a uniquely named temporary file and rename, so readers never see half a file. The file gets
    the mode a plain open() would give it (0644 under umask 022), not the temporary file's 0600."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with open(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fchmod(f.fileno(), 0o666 & ~_umask())
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _fsync_dir(path.parent)
    except OSError as err:
        raise UserError(f"cannot write {path} ({err.strerror}); the records saved so far are kept") from None


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shard_path(run_dir: Path, rank: int) -> Path:
    return run_dir / f"samples.rank{rank}.jsonl"


def drop_shards(run_dir: Path) -> None:
    for path in run_dir.glob(SHARD_GLOB):
        path.unlink(missing_ok=True)


def append_lines(path: Path, items: list[Record | Part]) -> None:
    """Append and fsync: a line is on disk before the next batch starts."""
    if not items:
        return
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(item.line() for item in items))
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise UserError(f"cannot append to {path} ({err.strerror}); the records saved so far are kept") from None


class RunStore:
    """The one writer of a run directory, holding its lock from open to close."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir
        self.samples = run_dir / "samples.jsonl"
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._lock = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"cannot write to output directory {run_dir} ({err.strerror})") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._lock, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._lock)
            raise UserError(f"{run_dir} is being written by another process (pid {holder}); wait for it to end, "
                            f"or use another --output-dir") from None
        os.ftruncate(self._lock, 0)
        os.pwrite(self._lock, f"{os.getpid()}\n".encode(), 0)

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # releases the lock
            self._lock = None

    def claim(self, identity: dict, planned: list[str], overwrite: bool) -> Saved:
        """Check (or, with overwrite, replace) the run's identity; then the saved records, shards included."""
        run_file = self.dir / "run.json"
        if overwrite:
            for name in ("samples.jsonl", "results.json", "table.md", "table.csv", "run.json"):
                (self.dir / name).unlink(missing_ok=True)
            drop_shards(self.dir)
        elif run_file.exists():
            identity = merged_identity(read_info(self.dir).identity, identity, self.dir)
        elif self.samples.exists() or list(self.dir.glob(SHARD_GLOB)):
            raise UserError(f"{self.dir} holds saved records but no run.json, so nothing says what made them: "
                            f"restore run.json, or pass --overwrite to discard the records")
        self.write_info(RunInfo(identity, planned))
        saved = read_samples(self.samples, repair=True)
        for path in sorted(self.dir.glob(SHARD_GLOB)):
            saved.merge(read_samples(path, repair=True), str(path))
        return saved

    def write_info(self, info: RunInfo) -> None:
        atomic_write(self.dir / "run.json", json.dumps(dataclasses.asdict(info), indent=2, ensure_ascii=False))

    def append(self, items: list[Record | Part]) -> None:
        append_lines(self.samples, items)

    def rewrite(self, items: list[Record | Part]) -> None:
        """samples.jsonl in canonical order: it then does not depend on batching or resumes."""
        atomic_write(self.samples, "".join(item.line() for item in items))

    def finish(self, results: Results, title: str, notes: list[str] = ()) -> None:
        """The tables as shown (a standard-error column added, notes such as skipped rows below), results.json."""
        shown = with_stderr(results.table)
        atomic_write(self.dir / "table.md", render_markdown(shown, title, notes))
        atomic_write(self.dir / "table.csv", render_csv(shown))
        atomic_write(self.dir / "results.json", results.to_json())


def merged_identity(old: dict, new: dict, run_dir: Path) -> dict:
    """The saved identity extended by this invocation, or a one-line refusal saying what differs.

    Data files are compared one by one: a file both invocations read must be the same, while files only
    one of them read (another --subjects) are a different selection of the same run."""
    differ = sorted(k for k in set(old) | set(new) if k != "data" and old.get(k) != new.get(k))
    old_files, new_files = old.get("data", {}), new.get("data", {})
    changed = sorted(f for f in set(old_files) & set(new_files) if old_files[f] != new_files[f])
    if changed:
        differ.append(f"data ({changed[0]} changed)")
    if differ:
        raise UserError(f"{run_dir} holds a run with a different configuration ({', '.join(differ)} differ). "
                        f"Use another --output-dir, or --overwrite to discard it.")
    return {**new, "data": {**old_files, **new_files}}


# ---- rendering ---------------------------------------------------------------------------------------------
def _fmt(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def render_markdown(table: Table, title: str | None = None, notes: list[str] = ()) -> str:
    """The one Markdown table renderer (floats with two decimals); a ### title above it when given, notes
    (e.g. skipped data rows) below it."""
    head = [f"### {title}", ""] if title else []
    lines = head + ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in table.rows]
    lines += ["", *notes] if notes else []
    return "\n".join(lines) + "\n"


def render_csv(table: Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(table.columns)
    writer.writerows(table.rows)
    return buf.getvalue()
