"""Checks of command-line values that need no model weights. Each raises a one-line UserError naming
the flag and the value at fault; the runner calls them before any weight is read, because a mistake
found after a Qwen-7B load has cost minutes.
"""
from __future__ import annotations

import difflib
import re
import tempfile
from pathlib import Path

from .api import UserError
from .results import RunStore, merged_identity, read_info, read_samples

DEVICE = re.compile(r"auto|cpu|cuda(?::\d+)?")
WINDOW_PART = re.compile(r"(?:(\d+)x)?(\d+)")


def did_you_mean(name: str, known) -> str:
    """'; did you mean 'x'?' for the closest known name (case and dashes aside), or ''."""
    folded = {k.lower().replace("-", ""): k for k in known}
    close = difflib.get_close_matches(name.lower().replace("-", ""), list(folded), n=1)
    return f"; did you mean {folded[close[0]]!r}?" if close else ""


def positive_int(flag: str, value: int | None) -> None:
    """--limit, --batch-size, --samples: absent, or at least 1 (0 and negatives have no sensible meaning)."""
    if value is not None and value < 1:
        raise UserError(f"{flag} {value}: expected a positive integer (leave {flag} out for the default)")


def check_device(device: str) -> None:
    """auto, cpu, cuda or cuda:N, where this torch can reach that GPU."""
    if not DEVICE.fullmatch(device):
        raise UserError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no GPU is visible"
        raise UserError(f"--device {device}: no CUDA device available (torch {torch.__version__}: {build}); "
                        f"use --device cpu")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")


def check_window_attn(spec: str | None) -> None:
    """The syntax and sign of a --window-attn schedule; the layer count is checked with the config."""
    if spec is None or spec.strip().lower() in ("auto", "none", "off"):
        return
    for part in spec.split(","):
        match = WINDOW_PART.fullmatch(part.strip())
        if not match:
            raise UserError(f"--window-attn {spec}: cannot read {part.strip()!r} "
                            f"(expected SIZE or COUNTxSIZE groups, auto, or none)")
        if any(number is not None and int(number) < 1 for number in match.groups()):
            raise UserError(f"--window-attn {spec}: window sizes and layer counts must be at least 1 "
                            f"(for full attention use none)")


def check_subjects(task: str, requested: list[str], known: list[str]) -> None:
    if not known:
        raise UserError(f"--subjects: task {task} has no subjects; drop --subjects")
    for name in requested:
        if name not in known:
            raise UserError(f"--subjects: unknown {task} subject {name!r}{did_you_mean(name, known)}")


def check_writable(flag: str, folder: Path) -> None:
    """The nearest existing folder on the way to `folder` accepts a new file (nothing is left behind)."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {folder}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UserError(f"{flag} {folder}: cannot write in {existing} ({err.strerror})") from None


def check_same_configuration(run_dir: Path, known: dict, overwrite: bool) -> None:
    """Before the weights load: the parts of the run's identity known without them (`known`: all but the
    weights' fingerprint and the engine) must match the saved run's; run.json's full check follows the load."""
    if overwrite or not (run_dir / "run.json").exists():
        return
    saved = read_info(run_dir).identity
    merged_identity({key: saved[key] for key in known if key in saved}, known, run_dir)


def check_flags(config) -> None:
    """Every check of the general settings that needs only the run configuration (options were checked as read)."""
    for flag in ("limit", "batch_size"):
        positive_int(f"--{flag.replace('_', '-')}", getattr(config, flag))
    check_device(config.device)
    check_window_attn(config.window_attn)
    if config.backend == "api":  # a served model (eval/endpoint.py)
        if not config.backend_options.get("base_url"):
            raise UserError("--backend api needs --base-url URL")
        for flag in ("dynamic_ntk", "logn", "window_attn"):
            if getattr(config, flag) is not None:
                raise UserError(f"--{flag.replace('_', '-')}: a served model's positions are set by its server; "
                                "drop the flag with --backend api")
    check_writable("--output-dir", Path(config.output_dir))


def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Before the weights load: no other process writes the run directory, and its saved records can be read."""
    if not run_dir.is_dir():
        return
    RunStore(run_dir).close()  # another writer holds the lock: one line naming its pid
    if not overwrite:
        read_samples(run_dir / "samples.jsonl")  # a corrupt record in the middle: one line naming its line


def check_paths(model: str | None, tokenizer: str | None) -> None:
    """A local --tokenizer that is not there, or a --model that cannot be a checkpoint folder: said first."""
    if tokenizer and _local(tokenizer) and not Path(tokenizer).expanduser().exists():
        raise UserError(f"--tokenizer {tokenizer}: no such file or folder")  # (a missing --model: the loader says)
    if not model:
        return
    path = Path(model).expanduser()
    if path.is_file():
        raise UserError(f"--model {model}: a file; pass the checkpoint folder that holds it and config.json "
                        f"({path.parent})")
    packed = sorted(path.glob("*.safetensors.gz")) if path.is_dir() else []
    if packed and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise UserError(f"--model {model}: holds only {packed[0].name}; unpack it first: "
                        f"gunzip -c {packed[0]} > {packed[0].with_suffix('')}")


def _local(value: str) -> bool:
    """A path, not a hub id: absolute, ~ or ./ relative, or under a folder that exists here (scratch/missing)."""
    return value.startswith(("/", "~", ".")) or Path(value).expanduser().parent.is_dir() and "/" in value
