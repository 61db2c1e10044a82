"""PNG plots of a run, written next to its table.md: per-category accuracy bars for the multiple-choice
suites (categories.png) and perplexity against length per switch combination for long_ppl (perplexity.png).

A task's `plot` method draws its run with these (`report.plot_run` asks the task). Figures are drawn with
matplotlib's object API (no pyplot, no global backend state) and rendered by Agg into PNG files of a
fixed size (FIGSIZE x DPI pixels).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure

from .results import Results, atomic_write

FIGSIZE, DPI = (8.0, 4.5), 100  # 800 x 450 pixels: no tight bounding box, so the size never varies


def plot_perplexity(results: Results, path: Path) -> Path:
    """One line per switch row; both axes logarithmic (lengths double, perplexity explodes past training)."""
    details = results.details
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.subplots()
    lengths: set[int] = set()
    for row, cells in details["ppl"].items():
        points = sorted((int(n), ppl) for n, ppl in cells.items() if ppl is not None)
        if points:
            label = f"{row} ({details.get('window_attn', '?')})" if row.endswith("window") else row
            ax.plot(*zip(*points), marker="o", label=label)
            lengths.update(n for n, _ in points)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis_formatter(ticker.LogFormatter(labelOnlyBase=False))  # "300", not "3 x 10^2"
    ax.set_xticks(sorted(lengths), [str(n) for n in sorted(lengths)])
    ax.set_xlabel("sample length (tokens)")
    ax.set_ylabel("perplexity (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(_title(results), fontsize=10)
    return _save(fig, path)


def plot_categories(results: Results, groups: list[str], path: Path) -> Path:
    """Grouped bars: the average and each category, one bar per accuracy column of the run's table."""
    metrics = results.table.columns[2:]  # after "name" and "n"
    rows = [results.table.rows[0]] + [r for r in results.table.rows if r[0] in groups]
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.subplots()
    x, width = np.arange(len(rows)), 0.8 / len(metrics)
    for i, metric in enumerate(metrics):
        ax.bar(x + (i - (len(metrics) - 1) / 2) * width, [r[2 + i] for r in rows], width, label=metric)
    ax.axhline(25, color="gray", linestyle=":", linewidth=1, label="chance (4 choices)")
    ax.set_xticks(x, [f"{r[0]}\n(n={r[1]})" for r in rows], fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=8)
    ax.set_title(_title(results), fontsize=10)
    return _save(fig, path)


def _title(results: Results) -> str:
    model = results.identity.get("model_name", "?")
    partial = f" (PARTIAL: {results.n_done} of {results.n_docs})" if results.partial else ""
    return f"{results.task} ({results.mode}) - {model}{partial}"


def _save(fig: Figure, path: Path) -> Path:
    """Render to PNG in memory, then the one atomic writer: a reader never sees half an image."""
    png = io.BytesIO()
    fig.savefig(png, format="png")
    atomic_write(path, png.getvalue())
    return path
