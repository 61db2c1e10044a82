"""python eval/runner.py compare BASE_RUN NEW_RUN: two runs paired document by document; exit 1 on a regression.

BASE_RUN and NEW_RUN are run directories (run.json, samples.jsonl) or directories above them (e.g.
results/base/Qwen-7B): run directories are then paired by name (mmlu-fewshot, gsm8k-chat, ...).
Per task, on the documents both runs hold: the headline score of each run, the delta, a paired
test (exact McNemar for right/wrong scores, paired bootstrap otherwise) and the documents that
flipped; the same per category (MMLU, C-Eval, CMMLU) and per long_ppl length, for information.
The gate looks at headline scores only: a drop of at least --max-drop points is a regression (exit 1);
with --alpha, only when the paired test also gives p < alpha. Runs whose prompts or data differ are
refused unless --allow-different-prompts.
"""
from __future__ import annotations

import argparse
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .api import AccuracyScores, PerplexityScores, Table, UserError
from .metrics import average
from .registry import get_task
from .results import Run, read_run, render_markdown
from .stats import bootstrap_p, bootstrap_sums, mcnemar_exact


# ---- runs ---------------------------------------------------------------------------------------
def run_dirs(path: Path) -> dict[str, Path]:
    """Run directories at or below `path`, by name."""
    if not path.is_dir():
        raise UserError(f"{path} is not a directory")
    if (path / "run.json").exists():
        return {path.name: path}
    found: dict[str, Path] = {}
    for run_file in sorted(path.rglob("run.json")):
        name = run_file.parent.name
        if name in found:
            raise UserError(f"{path} holds two runs named {name} ({found[name]}, {run_file.parent}); "
                            f"point at one model's directory")
        found[name] = run_file.parent
    if not found:
        raise UserError(f"{path}: no run directories (run.json) below it")
    return found


def pair_runs(base: Path, new: Path) -> tuple[list[tuple[Path, Path]], list[str]]:
    """(base, new) run directory pairs, and notes on what could not be paired."""
    base_dirs, new_dirs = run_dirs(base), run_dirs(new)
    if len(base_dirs) == len(new_dirs) == 1 and (base / "run.json").exists() and (new / "run.json").exists():
        return [(base, new)], []  # two runs named explicitly: compare them whatever their names
    names = [name for name in base_dirs if name in new_dirs]
    if not names:
        raise UserError(f"no run of {base} has a namesake in {new} "
                        f"(base: {', '.join(base_dirs)}; new: {', '.join(new_dirs)})")
    notes = [f"{name}: only in base" for name in base_dirs if name not in new_dirs]
    notes += [f"{name}: only in new" for name in new_dirs if name not in base_dirs]
    return [(base_dirs[name], new_dirs[name]) for name in names], notes


def require_same_task(base: Run, new: Run) -> None:
    """Runs of two tasks or modes measure different things: refused before anything else is looked at."""
    if (base.task, base.mode) != (new.task, new.mode):
        what = "different tasks" if base.task != new.task else "different modes"
        raise UserError(f"cannot compare {base.task} ({base.mode}) in {base.dir} "
                        f"with {new.task} ({new.mode}) in {new.dir}: {what}")


def comparable(base: Run, new: Run, shared: list[str], allow_different: bool) -> list[str]:
    """Why the two runs' scores are not comparable; raises unless `allow_different`."""
    reasons = []
    base_files, new_files = base.identity.get("data", {}), new.identity.get("data", {})
    changed = sorted(f for f in set(base_files) & set(new_files) if base_files[f] != new_files[f])
    if changed or not isinstance(base_files, dict):
        reasons.append(f"the data files differ (identity.data: {changed[0] if changed else 'another format'})")
    # Per-document prompt hashes (prompt text and token ids) are stricter than provenance.prompts_hash, and
    # still allow comparing runs of different --limit on the documents they share.
    changed = [d for d in shared if base.records[d].get("prompt_hash") != new.records[d].get("prompt_hash")]
    if changed:
        reasons.append(f"{len(changed)} of {len(shared)} shared documents have different prompts (first: {changed[0]})")
    if reasons and not allow_different:
        raise UserError(f"{base.task} ({base.mode}): refusing to compare {base.dir} with {new.dir}: "
                        f"{'; '.join(reasons)}. Pass --allow-different-prompts to compare anyway.")
    return reasons


# ---- comparisons -------------------------------------------------------------------------------------
@dataclass
class Comparison:
    name: str
    n: int
    base: float
    new: float
    test: str
    p: float
    drop: float  # how much worse new is: accuracy points lost, or percent perplexity rise
    gated: bool  # a headline score (the gate looks at these only)
    worse: list[str] = field(default_factory=list)  # doc ids whose score went down (right -> wrong)
    better: list[str] = field(default_factory=list)
    unit: str = ""  # of `drop`: "" accuracy points, "%" perplexity

    def regression(self, max_drop: float, alpha: float | None) -> bool:
        return self.gated and self.drop >= max_drop and (alpha is None or self.p < alpha)


def compare_accuracy(base: Run, new: Run, shared: list[str], spec: AccuracyScores) -> list[Comparison]:
    try:
        scores = {d: (spec.score(base.records[d]), spec.score(new.records[d])) for d in shared}
    except (KeyError, TypeError):
        raise UserError(f"{base.task} ({base.mode}): a record lacks the per-document {spec.metric} score") from None
    subjects = {d: base.records[d].get("subject", "") for d in shared}
    averaging = spec.averaging
    units = [accuracy_comparison(f"{spec.metric} ({averaging})", shared, scores, subjects, averaging, gated=True)]
    for group, members in spec.groups.items():
        docs = [d for d in shared if subjects[d] in members]
        if docs:
            units.append(accuracy_comparison(group, docs, scores, subjects, averaging, gated=False))
    return units


def accuracy_comparison(name, docs, scores, subjects, averaging, gated) -> Comparison:
    base = average(by_subject(docs, subjects, {d: scores[d][0] for d in docs}), averaging)
    new = average(by_subject(docs, subjects, {d: scores[d][1] for d in docs}), averaging)
    worse = [d for d in docs if scores[d][1] < scores[d][0]]
    better = [d for d in docs if scores[d][1] > scores[d][0]]
    if all(v in (0.0, 1.0) for d in docs for v in scores[d]):
        test, p = "McNemar", mcnemar_exact(len(worse), len(better))
    else:  # pass rates of several samples per task
        columns = np.array([scores[d] for d in docs])
        sums = bootstrap_sums(columns)
        test, p = "bootstrap", bootstrap_p(new - base, 100 * (sums[:, 1] - sums[:, 0]) / len(docs))
    return Comparison(name, len(docs), base, new, test, p, base - new, gated, worse, better)


def by_subject(docs: list[str], subjects: dict[str, str], scores: dict[str, float]) -> dict[str, tuple[float, int]]:
    """(summed score, documents) per subject, for metrics.average."""
    out: dict[str, tuple[float, int]] = {}
    for d in docs:
        total, n = out.get(subjects[d], (0.0, 0))
        out[subjects[d]] = (total + scores[d], n + 1)
    return out


def compare_perplexity(base: Run, new: Run, shared: list[str], spec: PerplexityScores) -> list[Comparison]:
    """One gated score per row (all lengths, token-weighted), then each (row, length) cell."""
    lengths = sorted({spec.length(base.records[d]) for d in shared})
    rows = spec.rows(base.records[shared[0]])
    gated = [perplexity_comparison(f"ppl {row} (all lengths)", shared, base, new, spec, row, True) for row in rows]
    cells = [perplexity_comparison(f"ppl {row} @ {length}",
                                   [d for d in shared if spec.length(base.records[d]) == length],
                                   base, new, spec, row, False) for row in rows for length in lengths]
    return gated + cells


def perplexity_comparison(name, docs, base: Run, new: Run, spec: PerplexityScores, row: str, gated: bool) -> Comparison:
    """exp(summed NLL / summed tokens), as the task aggregates; paired bootstrap of the log-perplexity change."""
    columns = np.array([[x for run in (base, new) for x in spec.cell(run.records[d], row)] for d in docs], dtype=float)
    total = columns.sum(axis=0)
    observed = total[2] / total[3] - total[0] / total[1]
    sums = bootstrap_sums(columns)
    p = bootstrap_p(observed, sums[:, 2] / sums[:, 3] - sums[:, 0] / sums[:, 1])
    base_ppl, new_ppl = math.exp(total[0] / total[1]), math.exp(total[2] / total[3])
    rise = 100 * (new_ppl / base_ppl - 1)
    return Comparison(name, len(docs), base_ppl, new_ppl, "bootstrap", p, rise, gated, unit="%")


def compare_runs(base: Run, new: Run, allow_different: bool) -> tuple[list[Comparison], list[str]]:
    shared = [d for d in base.records if d in new.records]
    if not shared:
        raise UserError(f"{base.dir} and {new.dir} share no documents")
    warnings = comparable(base, new, shared, allow_different)
    spec = get_task(base.task).paired_scores(base.mode)
    if isinstance(spec, PerplexityScores):
        return compare_perplexity(base, new, shared, spec), warnings
    return compare_accuracy(base, new, shared, spec), warnings


# ---- output ------------------------------------------------------------------------------------------
def render_pair(base: Run, new: Run, units: list[Comparison], warnings: list[str], max_drop: float,
                alpha: float | None) -> str:
    shared = units[0].n  # the headline score covers every shared document
    differs = sorted(k for k in set(base.identity) | set(new.identity) if base.identity.get(k) != new.identity.get(k))
    lines = [f"## {base.task} ({base.mode})", "",
             f"- base: {base.dir}{'' if base.finished else ' (unfinished)'}",
             f"- new: {new.dir}{'' if new.finished else ' (unfinished)'}",
             f"- identity differs in: {', '.join(differs) or 'nothing'}",
             f"- documents compared: {shared} (only in base: {len(base.records) - shared}, "
             f"only in new: {len(new.records) - shared})",
             f"- model outputs: {_outputs_verdict(base, new)}"]
    lines += [f"- WARNING: {w}" for w in warnings]
    perplexity = units[0].unit == "%"
    table = Table(["score", "n", "base", "new", "delta", "drop", "test", "p", "right->wrong", "wrong->right", "gate"])
    for u in units:
        gate = ("REGRESSION" if u.regression(max_drop, alpha) else "ok") if u.gated else ""
        flips = ["-", "-"] if perplexity else [str(len(u.worse)), str(len(u.better))]
        table.rows.append([u.name, u.n, u.base, u.new, f"{u.new - u.base:+.2f}", f"{u.drop:.2f}{u.unit}", u.test,
                           f"{u.p:.3g}", *flips, gate])
    lines += ["", render_markdown(table).rstrip("\n")]
    headline = units[0]
    if not perplexity:
        binary = headline.test == "McNemar"
        for label, docs in ((("right -> wrong" if binary else "pass rate down"), headline.worse),
                            (("wrong -> right" if binary else "pass rate up"), headline.better)):
            lines += ["", textwrap.fill(f"{label} ({len(docs)}): {', '.join(docs) or '-'}", 110,
                                        subsequent_indent="    ", break_on_hyphens=False)]
    return "\n".join(lines) + "\n"


def _outputs_verdict(base: Run, new: Run) -> str:
    """Whether the shared documents' raw model outputs (logits, tokens, NLL) are bitwise the same: the
    runs of one model at two batch sizes must be, and then every score is too."""
    shared = [d for d in base.records if d in new.records]
    differ = [d for d in shared if base.records[d].get("responses") != new.records[d].get("responses")]
    if not differ:
        return f"identical for all {len(shared)} shared documents: the runs are identical"
    return f"differ for {len(differ)} of {len(shared)} documents (first: {differ[0]})"


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python eval/runner.py compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", type=Path, metavar="BASE_RUN")
    p.add_argument("new", type=Path, metavar="NEW_RUN")
    p.add_argument("--max-drop", type=float, default=1.0, metavar="POINTS",
                   help="fail when a headline score drops by at least this much (accuracy points; percent "
                        "perplexity rise for long_ppl; default 1)")
    p.add_argument("--alpha", type=float, help="fail only when the paired test also gives p below this "
                                               "(e.g. 0.05; default: the drop alone decides)")
    p.add_argument("--allow-different-prompts", action="store_true",
                   help="compare runs whose prompts or data files differ")
    args = p.parse_args(argv)
    if (args.alpha is not None and not 0 < args.alpha <= 1) or args.max_drop < 0:
        raise UserError("--alpha must be in (0, 1] and --max-drop at least 0")
    return args


def main(argv) -> int:
    args = parse_args(argv)
    pairs, notes = pair_runs(args.base, args.new)
    regressions, sections = [], []
    for base_dir, new_dir in pairs:
        base, new = read_run(base_dir), read_run(new_dir)
        require_same_task(base, new)
        if get_task(base.task).paired_scores(base.mode) is None:
            notes.append(f"{base_dir.name}: {base.task} has no per-document scores to compare")
            continue
        units, warnings = compare_runs(base, new, args.allow_different_prompts)
        sections.append(render_pair(base, new, units, warnings, args.max_drop, args.alpha))
        regressions += [f"{base.task} ({base.mode}) {u.name}: drop {u.drop:.2f}{u.unit or ' points'} (p = {u.p:.3g})"
                        for u in units if u.regression(args.max_drop, args.alpha)]
    print("\n".join(sections))
    for note in notes:
        print(f"not compared: {note}")
    rule = f"drop >= {args.max_drop:g}" + (f" and p < {args.alpha:g}" if args.alpha is not None else "")
    if regressions:
        print(f"REGRESSION ({rule}):\n" + "\n".join(f"  {r}" for r in regressions))
        return 1
    print(f"no regression ({rule})")
    return 0
