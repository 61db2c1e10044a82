"""eval/stats.py: standard errors (the tables' column, as lm-evaluation-harness shows one), intervals, paired tests."""
import math

from eval.api import Table
from eval.stats import macro_interval, mcnemar_exact, standard_error, wilson, with_stderr


def test_standard_error_of_right_wrong_scores_is_the_sample_deviation_over_root_n():
    scores = [1] * 30 + [0] * 70
    mean = sum(scores) / len(scores)
    sample_sd = math.sqrt(sum((x - mean) ** 2 for x in scores) / (len(scores) - 1))
    assert math.isclose(standard_error(30.0, 100), 100 * sample_sd / math.sqrt(100))
    assert standard_error(100.0, 5) == 0.0 and standard_error(50.0, 1) is None


def test_the_column_follows_the_headline_metric():
    table = Table(["name", "n", "acc", "invalid"], [["parity", 100, 30.0, 2], ["one", 1, 0.0, 0]])
    shown = with_stderr(table)
    assert shown.columns == ["name", "n", "acc", "stderr", "invalid"]
    assert shown.rows[0][:3] == ["parity", 100, 30.0] and math.isclose(shown.rows[0][3], standard_error(30.0, 100))
    assert shown.rows[1][3] == "" and table.columns == ["name", "n", "acc", "invalid"]  # the input is untouched
    perplexity = Table(["switches", "1024"], [["none", 4.2]])
    assert with_stderr(perplexity) is perplexity


def test_wilson_interval_checked_by_hand():
    low, high = wilson(57.0, 400)
    assert (round(low, 2), round(high, 2)) == (52.1, 61.76)
    assert wilson(50.0, 0) is None
    assert macro_interval(75.0, [50, 50]) == wilson(75.0, 100)  # S^2 / sum(1/n) documents


def test_exact_mcnemar_values():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 5) == mcnemar_exact(5, 0) == 2 / 32
    assert mcnemar_exact(1, 9) == 2 * (1 + 10) / 1024
    assert mcnemar_exact(3, 3) == 1.0
    assert 0 < mcnemar_exact(3000, 3300) < 0.001  # thousands of flips: no underflow
