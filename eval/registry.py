"""Task registry: name -> task module's TASK, with listing and "did you mean"."""
from __future__ import annotations

import difflib
import importlib

from .api import UserError

TASK_MODULES = ("mmlu", "ceval", "cmmlu", "gsm8k", "humaneval", "long_ppl", "profile", "tooluse")


def task_names() -> list[str]:
    return list(TASK_MODULES)


def get_task(name: str):
    if name not in TASK_MODULES:
        close = difflib.get_close_matches(name, TASK_MODULES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"unknown task {name!r}{hint} (known: {', '.join(TASK_MODULES)}; see --list-tasks)")
    return importlib.import_module(f"eval.tasks.{name}").TASK
