"""The standard-error column of the tables (lm-evaluation-harness shows one)."""
import math

from eval.api import Table
from eval.metrics import standard_error, with_stderr


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
