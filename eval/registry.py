"""Task registry: name -> task module's TASK, with listing and "did you mean"."""
from __future__ import annotations

import importlib

from .api import UserError
from .cli_checks import did_you_mean

TASK_MODULES = ("mmlu", "ceval", "cmmlu", "gsm8k", "humaneval", "long_ppl", "profile", "tooluse")


def task_names() -> list[str]:
    return list(TASK_MODULES)


def get_task(name: str):
    if name not in TASK_MODULES:
        raise UserError(f"unknown task {name!r}{did_you_mean(name, TASK_MODULES)} "
                        f"(known: {', '.join(TASK_MODULES)}; see --list-tasks)")
    return importlib.import_module(f"eval.tasks.{name}").TASK
