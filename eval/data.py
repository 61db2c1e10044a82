"""Benchmark data: a local --data-dir in the original release layouts, or the Hugging Face hub.

Readers name the file and row at fault. With `skip_bad_rows` a bad row is skipped and counted
instead (the count lands in results.json); a wrong score is never produced silently.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .api import UserError

CACHE_DIR = Path(os.environ.get("QWEN_EVAL_CACHE", Path.home() / ".cache" / "qwen-eval"))


@dataclass
class DataSource:
    root: Path | None  # None: the Hugging Face hub
    skip_bad_rows: bool = False
    verbatim_csv: bool = False  # read CSV cells as written, instead of pandas' default parsing (parity)
    skipped: list[str] = field(default_factory=list)  # "file:row: reason" for every skipped row
    files: dict[str, str] = field(default_factory=dict)  # path -> sha256 of every file read

    def path(self, bench: str, *parts: str, what: str = "") -> Path:
        """ROOT/bench/parts..., with an error that says what is missing and how to point at it."""
        path = self.root.joinpath(bench, *parts)
        if not path.exists():
            raise UserError(f"{path} not found{f' ({what})' if what else ''}: --data-dir must hold the "
                            f"original release layout of {bench} (see EVALUATION.md, 'Data')")
        return path

    def _record(self, path: Path) -> None:
        name = str(path.relative_to(self.root)) if self.root and path.is_relative_to(self.root) else str(path)
        self.files[name] = hashlib.sha256(path.read_bytes()).hexdigest()

    def bad_row(self, where: str, reason: str) -> None:
        """A row that cannot be scored: an error, or a counted skip when the user tolerates them."""
        if not self.skip_bad_rows:
            raise UserError(f"{where}: {reason} (pass --skip-bad-rows to skip and count such rows)")
        self.skipped.append(f"{where}: {reason}")

    def read_csv(self, path: Path, **kw) -> pd.DataFrame:
        self._record(path)
        if self.verbatim_csv:
            kw.update(dtype=str, keep_default_na=False)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", pd.errors.ParserWarning)  # surplus fields: reported below
                frame = pd.read_csv(path, **kw)
        except pd.errors.EmptyDataError:
            raise UserError(f"{path}: empty file") from None
        except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
            raise UserError(f"{path}: malformed CSV ({str(err).strip()})") from None
        if frame.empty:
            raise UserError(f"{path}: empty file (no data rows)")
        if "names" in kw:  # pandas drops surplus fields silently when names are given: find and name the row
            self._check_field_counts(path, len(kw["names"]))
        return frame

    def _check_field_counts(self, path: Path, expected: int) -> None:
        with open(path, newline="", encoding="utf-8") as f:
            for line, fields in zip(csv_record_lines(path), filter(None, csv.reader(f))):
                if len(fields) > expected:
                    raise UserError(f"line {line} of {path}: malformed CSV: {len(fields)} fields, expected {expected}")

    def read_jsonl(self, path: Path) -> list[tuple[int, dict]]:
        """(0-based line, object) for every non-empty line; bad JSON names the line."""
        self._record(path)
        opener = gzip.open if path.suffix == ".gz" else open
        rows = []
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    rows.append((line_no, json.loads(line)))
                except json.JSONDecodeError as err:
                    self.bad_row(f"{path}:{line_no + 1}", f"not valid JSON ({err.msg})")
        if not rows:
            raise UserError(f"{path}: empty file")
        return rows

    def read_text(self, path: Path) -> str:
        self._record(path)
        return path.read_text(encoding="utf-8")

    def hub(self, name: str, config: str | None, split: str) -> list[dict]:
        """Rows of a hub dataset through `datasets`; offline, a clear error that says how to go local."""
        try:
            from datasets import load_dataset

            rows = list(load_dataset(name, config, split=split))
        except Exception as err:
            raise UserError(f"could not load {name}{f'/{config}' if config else ''} [{split}] from the Hugging Face "
                            f"hub ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Without "
                            f"network access, pass --data-dir ROOT holding the original release files "
                            f"(see EVALUATION.md, 'Data').") from None
        self.files[f"hf://{name}/{config}/{split}"] = f"{len(rows)} rows"
        return rows

    def fetch(self, url: str, name: str) -> Path:
        """A small file from a URL, cached under ~/.cache/qwen-eval."""
        target = CACHE_DIR / name
        if not target.exists():
            try:
                with urllib.request.urlopen(url, timeout=30) as resp:
                    data = resp.read()
            except OSError as err:
                raise UserError(f"could not download {url} ({err}). Without network access, pass --data-dir "
                                f"ROOT with the file at ROOT/{name}.") from None
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return target

    def manifest(self) -> dict:
        return {"root": str(self.root) if self.root else "huggingface-hub", "files": self.files,
                "skipped_rows": self.skipped}


def csv_record_lines(path: Path) -> list[int]:
    """The 1-based line on which each non-blank CSV record starts, a header included (a quoted cell may
    span lines, so record i is not always line i + 1); pandas skips blank lines the same way."""
    lines, start = [], 1
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        for fields in reader:
            if fields:
                lines.append(start)
            start = reader.line_num + 1
    return lines
