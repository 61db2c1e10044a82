"""Command-line checks that run before any weight loads: each names the flag and the value at fault."""
import dataclasses
import json
import os

import pytest
import torch

from eval import cli_checks
from eval.api import UserError
from eval.run_config import RunConfig
from eval.runner import parse_config


@pytest.mark.parametrize("flag,value", [("--limit", 0), ("--limit", -1), ("--batch-size", 0), ("--batch-size", -3)])
def test_counts_must_be_positive(flag, value):
    with pytest.raises(UserError, match=rf"^{flag} {value}: expected a positive integer"):
        cli_checks.positive_int(flag, value)
    cli_checks.positive_int(flag, 1)
    cli_checks.positive_int(flag, None)


def test_devices():
    for device in ("auto", "cpu"):
        cli_checks.check_device(device)
    for device in ("tpu", "cuda:x", "gpu0"):
        with pytest.raises(UserError, match=rf"^--device {device}: expected auto, cpu, cuda or cuda:N"):
            cli_checks.check_device(device)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="^--device cuda: no CUDA device available.*use --device cpu"):
            cli_checks.check_device("cuda")
    with pytest.raises(UserError, match="^--device cuda:999: "):
        cli_checks.check_device("cuda:999")


@pytest.mark.parametrize("spec", ["0", "4x0,8192", "0x2048,8192", "-5"])
def test_window_sizes_must_be_positive(spec):
    with pytest.raises(UserError, match=rf"^--window-attn {spec}: "):
        cli_checks.check_window_attn(spec)


def test_window_specs_that_are_fine():
    for spec in (None, "auto", "none", "4x2048,4x4096,8192", "8192"):
        cli_checks.check_window_attn(spec)


def test_unknown_subject_suggests_the_closest():
    known = ["anatomy", "astronomy", "virology"]
    with pytest.raises(UserError, match=r"^--subjects: unknown mmlu subject 'anatomyy'; did you mean 'anatomy'\?"):
        cli_checks.check_subjects("mmlu", ["anatomy", "anatomyy"], known)
    with pytest.raises(UserError, match=r"unknown mmlu subject 'zzz'$"):
        cli_checks.check_subjects("mmlu", ["zzz"], known)
    with pytest.raises(UserError, match="task gsm8k has no subjects"):
        cli_checks.check_subjects("gsm8k", ["anatomy"], [])
    cli_checks.check_subjects("mmlu", ["virology"], known)


def test_unwritable_folders(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UserError, match=rf"^--output-dir {blocker}/results: {blocker} is a file, not a folder"):
        cli_checks.check_writable("--output-dir", blocker / "results")
    cli_checks.check_writable("--output-dir", tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists() and os.listdir(tmp_path) == ["a-file"]  # the probe leaves nothing
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UserError, match=f"cannot write in {locked}"):
            cli_checks.check_writable("--output-dir", locked / "results")


def test_a_run_directory_keeps_one_configuration(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"identity": {"model": "a", "dtype": "bf16"}}))
    cli_checks.check_same_configuration(tmp_path, {"model": "a", "dtype": "bf16"}, overwrite=False)
    with pytest.raises(UserError, match=r"different configuration \(dtype differ\).*--overwrite"):
        cli_checks.check_same_configuration(tmp_path, {"model": "a", "dtype": "fp32"}, overwrite=False)
    cli_checks.check_same_configuration(tmp_path, {"model": "a", "dtype": "fp32"}, overwrite=True)
    cli_checks.check_same_configuration(tmp_path / "fresh", {"model": "b"}, overwrite=False)


def test_check_flags_runs_them_all(tmp_path):
    config = RunConfig(limit=2, device="cpu", output_dir=str(tmp_path))
    cli_checks.check_flags(config)
    with pytest.raises(UserError, match="^--limit 0"):
        cli_checks.check_flags(dataclasses.replace(config, limit=0))
    with pytest.raises(UserError, match="^--device-map .* --backend hf"):
        parse_config(["--device-map", "auto"])
    with pytest.raises(UserError, match="^--samples 0"):
        parse_config(["--samples", "0"])
