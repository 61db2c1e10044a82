"""The statistics of measured numbers: standard errors, confidence intervals, paired tests.

None of this scores a document, so it is not part of a task's scorer fingerprint (eval/metrics.py is):
changing a statistic never invalidates a saved run.
"""
from __future__ import annotations

import math

import numpy as np

from .api import Table

Z95 = 1.959963984540054  # two-sided 95% normal quantile
BOOTSTRAP_ROUNDS = 10_000


# ---- standard errors -------------------------------------------------------------------------------------
def standard_error(percent: float, n: int) -> float | None:
    """Standard error (in points) of a mean of n right/wrong scores, as lm-evaluation-harness gives it:
    the sample standard deviation over sqrt(n). None below two documents."""
    if n < 2:
        return None
    p = percent / 100
    return 100 * math.sqrt(p * (1 - p) / (n - 1))


def with_stderr(table: Table) -> Table:
    """The table with a "stderr" column after its headline metric, for tables shaped name, n, metric (in
    percent), ...; any other table unchanged. A macro-averaged or several-sample row gets the same formula
    at its n, an approximation."""
    if table.columns[1:2] != ["n"] or len(table.columns) < 3 or "stderr" in table.columns:
        return table
    rows = []
    for row in table.rows:
        value, n = row[2], row[1]
        numeric = isinstance(value, (int, float)) and isinstance(n, int) and 0 <= value <= 100
        se = standard_error(value, n) if numeric else None
        rows.append(row[:3] + ["" if se is None else se] + row[3:])
    return Table(table.columns[:3] + ["stderr"] + table.columns[3:], rows)


# ---- confidence intervals --------------------------------------------------------------------------------
def wilson(percent: float, n: float) -> tuple[float, float] | None:
    """Wilson score interval (95%) of an accuracy (in percent) over n documents."""
    if n <= 0:
        return None
    p, z2 = percent / 100, Z95 ** 2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return 100 * (centre - half), 100 * (centre + half)


def macro_interval(percent: float, sizes: list[int]) -> tuple[float, float] | None:
    """A mean of S subject accuracies: Wilson at its effective size S^2 / sum(1/n_s) (the variance of the
    mean is p(1-p)/n_eff at a common p), so a run where every subject scores 0 still gets an interval."""
    return wilson(percent, len(sizes) ** 2 / sum(1 / n for n in sizes))


# ---- paired tests ------------------------------------------------------------------------------------------
def mcnemar_exact(worse: int, better: int) -> float:
    """Two-sided exact McNemar test: under no change, each discordant document flips either way with p = 1/2."""
    n = worse + better
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(worse, better) + 1))
    return min(1.0, 2 * tail / 2 ** n)  # exact integer arithmetic: no underflow for thousands of flips


def bootstrap_sums(columns: np.ndarray, rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0) -> np.ndarray:
    """Column sums of `rounds` resamples of the rows (documents) with replacement: [rounds, n_columns].

    Resampling whole rows keeps each document's values together (a paired bootstrap)."""
    rng = np.random.default_rng(seed)  # fixed: the same runs always give the same p-values and intervals
    n = len(columns)
    chunk = max(1, 1_000_000 // n)  # bounds memory to about chunk x n x n_columns numbers at a time
    sums = [columns[rng.integers(0, n, size=(min(chunk, rounds - start), n))].sum(axis=1)
            for start in range(0, rounds, chunk)]
    return np.concatenate(sums)


def bootstrap_p(observed: float, replicates: np.ndarray) -> float:
    """Two-sided p-value of a difference against zero: the replicates, centred on the observed
    difference, stand in for its distribution under no change."""
    if observed == 0:
        return 1.0
    extreme = int(np.sum(np.abs(replicates - observed) >= abs(observed)))
    return (extreme + 1) / (len(replicates) + 1)
