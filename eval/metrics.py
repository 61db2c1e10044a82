"""Metrics shared by the tasks: accuracy aggregation, pass@k, confidence intervals."""
from __future__ import annotations

import math

from .api import Table


def average(by_subject: dict[str, tuple[float, int]], averaging: str) -> float:
    """In percent, from each subject's (summed scores, documents). Micro: over all documents; macro: the mean of
    the subjects' accuracies (C-Eval, CMMLU)."""
    if averaging == "micro":
        return 100 * sum(total for total, _ in by_subject.values()) / sum(n for _, n in by_subject.values())
    return sum(100 * total / n for total, n in by_subject.values()) / len(by_subject)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), in the stable product form."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def standard_error(percent: float, n: int) -> float | None:
    """Standard error (in points) of a mean of n right/wrong scores, as lm-evaluation-harness gives it:
    the sample standard deviation over sqrt(n). None below two documents."""
    if n < 2:
        return None
    p = percent / 100
    return 100 * math.sqrt(p * (1 - p) / (n - 1))


def with_stderr(table):
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
