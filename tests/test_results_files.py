"""Files a run and a report leave behind: readable by a team (mode 0644 under umask 022), written whole."""
import os
import stat

import pytest

import fixtures
from eval.results import atomic_write
from eval.runner import main


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode_of(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_run_files_are_readable_by_the_team(tmp_path, umask_022):
    run_dir = fixtures.write_run(tmp_path / "m" / "gsm8k-fewshot", "gsm8k", "fewshot",
                                 [{"doc_id": "gsm8k/0", "parity": {"pred": 7, "correct": True},
                                   "improved": {"pred": 7, "correct": True}}])
    written = {p.name: mode_of(p) for p in run_dir.iterdir()}
    assert {"run.json", "samples.jsonl", "results.json", "table.md", "table.csv"} <= set(written)
    assert set(written.values()) == {0o644}, written


def test_atomic_write_follows_the_umask_and_takes_bytes(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "a.bin", b"\x89PNG")
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").read_bytes() == b"\x89PNG" and mode_of(tmp_path / "a.bin") == 0o640
    assert not list(tmp_path.glob(".*.tmp"))


def test_report_and_its_plots_are_readable_by_the_team(tmp_path, umask_022, capsys):
    records = [{"doc_id": f"mmlu/anatomy/{i}", "subject": "anatomy", "correct": i < 3, "correct_parity": i < 3,
                "correct_word_bounded": i < 3, "tie": False, "truncated": False, "rule": "regex1"} for i in range(5)]
    fixtures.write_run(tmp_path / "Qwen-7B" / "mmlu-fewshot", "mmlu", "fewshot", records)
    assert main(["report", str(tmp_path)]) == 0
    assert mode_of(tmp_path / "REPORT.md") == 0o644
    pngs = list((tmp_path / "report-plots").rglob("*.png"))
    assert pngs and {mode_of(p) for p in pngs} == {0o644}
