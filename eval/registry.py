"""Task registry: name -> task module's TASK, with listing, "did you mean", and the options the tasks declare."""
from __future__ import annotations

import importlib

from .api import Option, UserError
from .cli_checks import did_you_mean

TASK_MODULES = ("mmlu", "ceval", "cmmlu", "gsm8k", "humaneval", "long_ppl", "profile", "tooluse")


def task_names() -> list[str]:
    return list(TASK_MODULES)


def get_task(name: str, suites=()):
    """The task; an unknown name is one line with the closest task (or suite, where `suites` are named)."""
    if name not in TASK_MODULES:
        known = [*TASK_MODULES, *suites]
        also = f"; suites: {', '.join(suites)}" if suites else ""
        raise UserError(f"unknown task {name!r}{did_you_mean(name, known)} "
                        f"(known: {', '.join(TASK_MODULES)}{also}; see --list-tasks)")
    return importlib.import_module(f"eval.tasks.{name}").TASK


def task_options() -> dict[str, tuple[Option, list[str]]]:
    """Every option a task declares, by name, with the tasks that read it (one declaration per name)."""
    found: dict[str, tuple[Option, list[str]]] = {}
    for name in TASK_MODULES:
        for option in get_task(name).options:
            declared, readers = found.setdefault(option.name, (option, []))
            if declared != option:
                raise RuntimeError(f"task {name} declares option {option.name} unlike task {readers[0]}")
            readers.append(name)
    return found
