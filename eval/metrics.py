"""Scoring shared by the tasks: accuracy aggregation and pass@k. Part of every task's scorer fingerprint
(eval/provenance.py); the statistics of the numbers (standard errors, intervals, tests) are in eval/stats.py."""
from __future__ import annotations

import math


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

