"""python eval/runner.py report [RESULTS_DIR]: the published Qwen tables beside this harness's runs.

Finds every run (results.json) under RESULTS_DIR (default results/) and renders one Markdown table
per published table (eval/published.py): reported number, measured number, difference, 95% confidence
interval of the measured number and whether the reported number lies inside it (judged only for a run
of the whole benchmark). Each table names the published model and the measured ones. Plots go to
RESULTS_DIR/report-plots/ and are linked; the report goes to RESULTS_DIR/REPORT.md (atomically) and
stdout. Nothing is written into a run directory (results/reference/ holds committed runs).

Which run feeds a published row: same model size, same task, same mode (any mode for speed), and the same
quantisation tag in the model name (int4 / int8 / nf4, or none) as the published model. The size comes from
the model shape the run recorded (hidden size, layers, heads, MLP width), never from a name: a 14B checkpoint
in a folder called Qwen-7B is compared with the 14B tables. A run without a recorded shape, or of a shape no
release has (a test model), is compared with the Qwen-7B tables (its size shows as "unknown" under "Runs
found"). When several runs qualify, the first by: a run of the suite that asks for the report (a suite's own
runs), then run directory named <task>-<mode>[-<dtype>] (no switch overrides, native backend), then a run of
the whole benchmark (not --limit, --subjects or partial), then model named as published (case-insensitive),
then path order. --model restricts the runs considered to the named models.
"""
from __future__ import annotations

import argparse
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import published
from .api import AccuracyScores, PerplexityScores, Table, UserError
from .registry import get_task
from .results import Results, Run, atomic_write, read_results, read_run, render_markdown
from .stats import bootstrap_sums, macro_interval, wilson

QUANTISATION_TAGS = ("int4", "int8", "nf4")
PLOTS_DIR = "report-plots"
PPL_BOOTSTRAP_ROUNDS = 2_000


@dataclass
class Measured:
    value: float | None
    interval: tuple[float, float] | None = None
    note: str = ""


def plot_run(run_dir: Path, results: Results | None = None) -> list[Path]:
    """The run's plots, drawn by its task (none for tasks without categories or lengths), in run_dir."""
    results = results or read_results(run_dir)
    return get_task(results.task).plot(results, run_dir)


# ---- finding and matching runs -----------------------------------------------------------------------
def find_runs(root: Path, models: list[str] | None = None) -> list[Run]:
    """The runs under root (of `models` only, when given); none is an error: there is nothing to report."""
    runs = []
    for path in sorted(root.rglob("results.json")):
        try:
            runs.append(read_run(path.parent))
        except UserError as err:
            warnings.warn(f"{path}: skipped ({err})")
    if not runs:
        raise UserError(f"no run (results.json) under {root}: run some tasks first, or pass RESULTS_DIR")
    wanted = {m.lower() for m in models or ()}
    kept = [r for r in runs if not wanted or r.model_name.lower() in wanted]
    if not kept:
        found = ", ".join(sorted({r.model_name for r in runs}))
        raise UserError(f"--model {' '.join(models)}: no run of it under {root} (runs found of: {found})")
    return kept


def quantisation(model_name: str) -> str:
    return next((tag for tag in QUANTISATION_TAGS if tag in model_name.lower()), "")


def run_size(run: Run) -> str | None:
    """The released size of the model a run measured, from its recorded shape (None: none known)."""
    return published.size_of(run.identity.get("shape"))


def choose_run(runs: list[Run], table: published.Table, row: published.Row, own: set[Path]) -> Run | None:
    """The run that feeds a published row (the matching rule in this module's docstring); `own`: the
    resolved directories of the suite's runs, which come first."""
    model = row.model or table.model
    candidates = [r for r in runs if r.task == row.task and table.mode in (None, r.mode)
                  and quantisation(r.model_name) == quantisation(model) and (run_size(r) or "7B") == table.size]
    return min(candidates, default=None, key=lambda r: (r.dir.resolve() not in own, not plain_run(r),
                                                        bool(run_notes(r)), r.model_name.lower() != model.lower(),
                                                        str(r.dir)))


def plain_run(run: Run) -> bool:
    """A run folder named <task>-<mode>, or <task>-<mode>-<dtype>: no switch overrides, the native backend."""
    return re.fullmatch(rf"{re.escape(run.task)}-{re.escape(run.mode)}(-(fp32|bf16|fp16))?", run.dir.name) is not None


# ---- measured numbers and their intervals ----------------------------------------------------------------
def measure(run: Run, row: published.Row) -> Measured:
    task = get_task(row.task)
    spec = task.paired_scores(run.mode)
    if isinstance(spec, PerplexityScores):
        return perplexity(run, row, spec)
    if isinstance(spec, AccuracyScores) and spec.groups:  # a table of groups and subjects
        return grouped(run, row, spec)
    value = run.results.metrics.get(row.metric)
    if value is None:
        return Measured(None, note=f"no metric {row.metric}")
    if task.timed:
        return Measured(value, note="one timing on the run's own hardware")
    return Measured(value, wilson(value, run.results.n_done))


def grouped(run: Run, row: published.Row, spec: AccuracyScores) -> Measured:
    """The average or a category row of the run's table; Wilson intervals (macro: see macro_interval)."""
    table = run.results.table
    rows = table.rows
    line = rows[0] if row.part is None else next((r for r in rows if r[0] == row.part), None)
    if line is None:
        return Measured(None, note=f"no {row.part} subjects in the run")
    value, n = line[table.columns.index(row.metric)], line[1]
    details = run.results.details
    if details.get("averaging") != "macro":
        return Measured(value, wilson(value, n))
    members = spec.groups.get(row.part) if row.part else None
    per_subject = details["per_subject"]
    subjects = [s for s in per_subject if members is None or s in members]
    return Measured(value, macro_interval(value, [per_subject[s]["n"] for s in subjects]))


def perplexity(run: Run, row: published.Row, spec: PerplexityScores) -> Measured:
    """Token-weighted perplexity of one (switch row, length) cell; percentile bootstrap over its samples."""
    switches, length = row.part
    value = run.results.details["ppl"].get(switches, {}).get(str(length))
    if value is None:
        return Measured(None, note=f"length {length} not run")
    columns = np.array([spec.cell(r, switches) for r in run.records.values() if spec.length(r) == length], dtype=float)
    if not len(columns):
        return Measured(value, note="no samples.jsonl: no interval")
    sums = bootstrap_sums(columns, PPL_BOOTSTRAP_ROUNDS)
    low, high = np.percentile(np.exp(sums[:, 0] / sums[:, 1]), [2.5, 97.5])
    return Measured(value, (float(low), float(high)), note=f"{len(columns)} samples")


# ---- rendering ---------------------------------------------------------------------------------------------
COLUMNS = ("benchmark", "metric", "reported", "measured", "difference", "95% CI", "within CI", "run", "notes")


def row_cells(row: published.Row, run: Run | None, root: Path, table_model: str) -> list[str]:
    if row.task is None:
        cells = [row.label, "-", f"{row.reported:g}", "n/a", "", "", "", "", row.note]
    elif run is None:
        cells = [row.label, row.metric, f"{row.reported:g}", "not run", "", "", "", "", row.note]
    else:
        m = measure(run, row)
        other = run.model_name.lower() != (row.model or table_model).lower()
        notes = "; ".join(x for x in (run_notes(run), f"measured model: {run.model_name}" if other else "",
                                      "weights not fingerprinted" if run.results.identity.get("backend") == "api"
                                      else "", m.note, row.note) if x)
        measured = "-" if m.value is None else f"{m.value:.2f}"
        difference = "" if m.value is None else f"{m.value - row.reported:+.2f}"
        interval = f"[{m.interval[0]:.2f}, {m.interval[1]:.2f}]" if m.interval else ""
        within = _within(m.interval, row.reported) if not run_notes(run) else "n/a: not the whole benchmark"
        cells = [row.label, row.metric, f"{row.reported:g}", measured, difference, interval, within,
                 f"`{run.dir.relative_to(root)}`", notes]
    return cells


def _within(interval: tuple[float, float] | None, reported: float) -> str:
    return ("yes" if interval[0] <= reported <= interval[1] else "no") if interval else ""


def run_notes(run: Run) -> str:
    """What makes a run not the full published setting: unfinished, or limited to a subset."""
    results, config = run.results, run.results.config
    notes = [f"PARTIAL: {results.n_done} of {results.n_docs} documents"] if results.partial else []
    if config.get("limit"):
        notes.append(f"--limit {config['limit']}")
    subjects = (config.get("subjects") or "").split(",")
    if subjects != [""]:
        notes.append(f"--subjects {','.join(subjects)}" if len(subjects) <= 3 else f"{len(subjects)} --subjects")
    return "; ".join(notes)


def render_table(table: published.Table, picks: list[Run | None], root: Path, plots: dict | None) -> str:
    """The published table with measurements from `picks` (one run or None per row); plots linked below."""
    measured = sorted({run.model_name for run in picks if run is not None})
    cells = [row_cells(row, run, root, table.model) for row, run in zip(table.rows, picks)]
    lines = [f"## {table.title}", "", f"Source: {table.source}.", "",
             f"Published numbers of {table.model}; measured: {', '.join(measured) or 'no run'}.", "",
             render_markdown(Table(list(COLUMNS), cells)).rstrip("\n")]
    if plots is not None:
        for run in {r.dir: r for r in picks if r is not None}.values():  # each run once, in table order
            if run.dir not in plots:
                out = root / PLOTS_DIR / run.dir.relative_to(root)  # never into the run directory itself
                out.mkdir(parents=True, exist_ok=True)
                plots[run.dir] = plot_run(out, run.results)
            lines += [f"\n![{run.task} ({run.mode}), {run.model_name}]({p.relative_to(root).as_posix()})"
                      for p in plots[run.dir]]
    return "\n".join(lines) + "\n"


def render_runs(runs: list[Run], root: Path, used: set[Path]) -> str:
    rows = [[f"`{run.dir.relative_to(root)}`", run.task, run.mode, run.model_name,
             f"{run.results.n_done} of {run.results.n_docs}", "yes" if run.dir in used else "no",
             run_size(run) or "unknown"] for run in runs]
    columns = ["run", "task", "mode", "model", "documents", "used", "size (from the recorded shape)"]
    return "## Runs found\n\n" + render_markdown(Table(columns, rows))


def render_report(root: Path, runs: list[Run], with_plots: bool = True, own: Iterable[Path] = ()) -> str:
    """The report's Markdown; `own`: run directories preferred for their rows (a suite's runs)."""
    plots: dict[Path, list[Path]] | None = {} if with_plots else None  # run dir -> its PNGs, drawn once
    own = {Path(d).resolve() for d in own}
    sizes = {"7B"} | {run_size(run) for run in runs}  # the 7B tables always; another size's once a run has it
    chosen = [(t, [choose_run(runs, t, row, own) if row.task else None for row in t.rows])
              for t in published.TABLES if t.size in sizes]
    used = {run.dir for _, picks in chosen for run in picks if run is not None}
    header = ("# Reproduction report: published Qwen numbers vs measured\n\n"
              f"{len(runs)} run(s) found under `{root}`. The metric column names the results.json metric "
              "measured: the original scripts' scoring (parity). 95% CI of the measured number: Wilson for "
              "micro-averaged accuracies (MMLU, GSM8K, HumanEval), Wilson at the effective number of documents "
              "for macro averages (C-Eval, CMMLU), percentile bootstrap over samples for perplexity. "
              "\"within CI\": the reported number lies inside it; judged only for a run of the whole benchmark "
              "(not --limit, --subjects or partial). Each table compares with the published model it names, and "
              "takes only runs of that model's size (by the shape each run recorded). "
              "Matching rule: `python eval/runner.py report --help`.\n")
    tables = [render_table(t, picks, root, plots) for t, picks in chosen]
    return "\n".join([header, *tables, render_runs(runs, root, used)])


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python eval/runner.py report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results_dir", nargs="?", default="results", type=Path, metavar="RESULTS_DIR")
    p.add_argument("--model", action="append", help="consider only runs of this model (repeat for several)")
    p.add_argument("--no-plots", action="store_true", help="do not write or link PNG plots")
    return p.parse_args(argv)


def main(argv) -> int:
    args = parse_args(argv)
    root = args.results_dir
    if not root.is_dir():
        raise UserError(f"{root} is not a directory (run some tasks first, or pass RESULTS_DIR)")
    write_report(root, args.model, with_plots=not args.no_plots)
    return 0


def write_report(root: Path, models: list[str] | None = None, *, own: Iterable[Path] = (),
                 with_plots: bool = True) -> Path:
    """root/REPORT.md (atomically), printed, and where it went. A suite passes its runs' directories as
    `own`: its rows then show its runs, not an older run of the same model."""
    text = render_report(root, find_runs(root, models), with_plots, own)
    path = root / "REPORT.md"
    atomic_write(path, text)
    print(text)
    print(f"report written to {path}")
    return path
