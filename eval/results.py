"""A run's directory: identity, append-only per-document records, atomic final tables.

    results/<model>/<task>-<mode>[-<switches>]/
        run.json        what this run is (model, mode, switches, task version, data hashes): never mixes
        samples.jsonl   one record per document, appended, flushed and fsynced after every batch
        results.json    metrics, tables, configuration and provenance (written atomically)
        table.md, table.csv

A run killed at any moment loses at most the batch in flight; a torn last line is dropped with a
warning. Re-running the same command resumes; a different configuration is refused.
"""
from __future__ import annotations

import csv
import io
import json
import os
import warnings
from pathlib import Path

from .api import Table, UserError
from .cli_checks import check_same_configuration


def atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


SHARD_GLOB = "samples.rank*.jsonl"  # a torchrun job's rank k appends to samples.rank<k>.jsonl


def shard_path(run_dir: Path, rank: int) -> Path:
    return run_dir / f"samples.rank{rank}.jsonl"


def drop_shards(run_dir: Path) -> None:
    for path in run_dir.glob(SHARD_GLOB):
        path.unlink(missing_ok=True)


def open_run(run_dir: Path, identity: dict, overwrite: bool) -> tuple["RunStore", dict]:
    """Claim the run directory; saved records by doc_id, those an earlier torchrun job left in shards included."""
    fresh = overwrite or not (run_dir / "run.json").exists()  # shards of unknown or discarded runs never count
    store = RunStore(run_dir, identity, overwrite)
    if fresh:
        drop_shards(run_dir)
    saved = store.load()
    for path in sorted(run_dir.glob(SHARD_GLOB)):
        for doc_id, record in RunStore.reader(path).load().items():
            saved.setdefault(doc_id, record)
    return store, saved


class RunStore:
    def __init__(self, run_dir: Path, identity: dict, overwrite: bool = False):
        self.dir = run_dir
        self.samples = run_dir / "samples.jsonl"
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise UserError(f"cannot write to output directory {run_dir} ({err.strerror})") from None
        self._claim(identity, overwrite)

    @classmethod
    def reader(cls, samples: Path) -> "RunStore":
        """The reading (torn last line dropped) and fsynced appending of a records file, claiming nothing."""
        store = cls.__new__(cls)
        store.dir, store.samples = samples.parent, samples
        return store

    def _claim(self, identity: dict, overwrite: bool) -> None:
        run_file = self.dir / "run.json"
        check_same_configuration(self.dir, identity, overwrite)  # again here, for callers other than the runner
        if overwrite or not run_file.exists():  # a discarded run, or records that no run.json vouches for
            for name in ("samples.jsonl", "results.json", "table.md", "table.csv"):
                (self.dir / name).unlink(missing_ok=True)
        atomic_write(run_file, json.dumps({"identity": identity}, indent=2, ensure_ascii=False))

    def load(self) -> dict[str, dict]:
        """Saved records by doc_id. A torn last line (no newline, or unparsable) is dropped and cut off."""
        if not self.samples.exists():
            return {}
        data = self.samples.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        records, good_bytes = {}, 0
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                if number == len(lines) and not tail:
                    tail = line
                    break
                raise UserError(f"{self.samples}:{number}: corrupt record in the middle of the file") from None
            records[record["doc_id"]] = record
            good_bytes += len(line) + 1
        if tail:
            warnings.warn(f"{self.samples}: dropped a torn last line ({len(tail)} bytes) left by an interrupted run")
            with open(self.samples, "r+b") as f:
                f.truncate(good_bytes)
        return records

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
        with open(self.samples, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def finish(self, results: dict, table: Table, title: str, notes: list[str] = ()) -> None:
        atomic_write(self.dir / "table.md", render_markdown(table, title, notes))
        atomic_write(self.dir / "table.csv", render_csv(table))
        atomic_write(self.dir / "results.json", json.dumps(results, indent=2, ensure_ascii=False, default=str))


def _fmt(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def render_markdown(table: Table, title: str, notes: list[str] = ()) -> str:
    """The table under its title; notes (e.g. skipped data rows) below it."""
    lines = [f"### {title}", "", "| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in table.rows]
    lines += ["", *notes] if notes else []
    return "\n".join(lines) + "\n"


def render_csv(table: Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(table.columns)
    writer.writerows(table.rows)
    return buf.getvalue()
