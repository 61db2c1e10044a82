"""Named suites: one --task name for the runs behind a published table (eval/published.py), each task
in its own run directory, in the mode and with the scoring flags that the published numbers used."""
from __future__ import annotations

from dataclasses import dataclass, field

from . import published
from .api import UserError
from .registry import get_task


@dataclass(frozen=True)
class Entry:
    task: str
    mode: str
    flags: dict = field(default_factory=dict, compare=False)  # task options (by name) set for this run
    model: str = field(default="", compare=False)  # the hub id run without --model ("": the mode's default)


def table_entries(table: published.Table) -> tuple[Entry, ...]:
    """One entry per task measured in the table (rows of another model, e.g. Int4, excluded); each runs with the
    options its task says the published number used (Task.published_options)."""
    tasks = dict.fromkeys(row.task for row in table.rows if row.task and not row.model)
    model = f"Qwen/{table.model}" if table.size != "7B" else ""
    return tuple(Entry(task, table.mode, get_task(task).published_options.get(f"{table.size} {table.mode}", {}), model)
                 for task in tasks)


SUITES = {"qwen-7b-base": table_entries(published.BASE), "qwen-7b-chat": table_entries(published.CHAT)}
for _size, (_base, _chat, _long) in published.FAMILY.items():  # qwen-14b-base, qwen-72b-chat, ...
    SUITES[f"qwen-{_size.lower()}-base"] = table_entries(_base)
    SUITES[f"qwen-{_size.lower()}-chat"] = table_entries(_chat)
# Every published accuracy and perplexity table; the speed table (profile) wants a GPU, so it is run alone.
SUITES["all"] = (SUITES["qwen-7b-base"] + table_entries(published.LONG_PPL) + SUITES["qwen-7b-chat"]
                 + (Entry("tooluse", "chat"),))


def expand(names: list[str], mode: str | None) -> list[Entry]:
    """Suite names become their entries; a plain task name runs in `mode` (None: not given, fewshot). Repeats are
    dropped. A suite sets its tasks' modes: a --mode it does not use is refused, as is an unknown name."""
    entries = []
    for name in names:
        if name not in SUITES:
            get_task(name, suites=SUITES)  # an unknown name: one line with the closest task or suite
        elif mode is not None and {e.mode for e in SUITES[name]} != {mode}:
            raise UserError(f"--mode {mode}: suite {name} sets each task's mode "
                            f"({', '.join(sorted({e.mode for e in SUITES[name]}))}); drop --mode")
        for entry in SUITES.get(name, (Entry(name, mode or "fewshot"),)):
            if entry not in entries:
                entries.append(entry)
    return entries
