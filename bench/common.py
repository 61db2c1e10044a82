"""What the benchmark scripts share: where their outputs go, and the one table printer."""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from eval.api import Table
from eval.results import render_markdown

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def default_out(name: str) -> str:
    """bench/results/<name>: where a script writes its raw numbers unless --out says otherwise."""
    return str(RESULTS_DIR / name)


def write_json(path: str | Path, result: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def print_table(columns: Sequence[str], rows: Iterable[Sequence]) -> None:
    """A Markdown table, cells shown as they are (eval's renderer would round floats to two decimals)."""
    print("\n" + render_markdown(Table(list(columns), [[str(cell) for cell in row] for row in rows])), end="")
