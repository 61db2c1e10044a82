"""Named suites: one --task name for the runs behind a published table (eval/published.py), each task
in its own run directory, in the mode and with the scoring flags that the published numbers used."""
from __future__ import annotations

from dataclasses import dataclass, field

from . import published


@dataclass(frozen=True)
class Entry:
    task: str
    mode: str
    flags: dict = field(default_factory=dict, compare=False)  # runner flags (argparse dest) set for this run
    model: str = field(default="", compare=False)  # the hub id run without --model ("": the mode's default)


# Where the published number used other scoring than the runner's default, by (table's model, task, mode):
# published.CHAT's note; the family's chat numbers (November 2023) used the default rules, and the tool-use
# rows the data version they name.
PUBLISHED_FLAGS = {("Qwen-7B-Chat", "ceval", "chat"): {"ceval_chat_rules": "2023-08-03"}}
FAMILY_FLAGS = {"tooluse": {"tooluse_version": "v20231206"}}


def table_entries(table: published.Table) -> tuple[Entry, ...]:
    """One entry per task measured in the table (rows of another model, e.g. Int4, excluded)."""
    tasks = dict.fromkeys(row.task for row in table.rows if row.task and not row.model)
    flags = FAMILY_FLAGS if table.size != "7B" else {}
    model = f"Qwen/{table.model}" if table.size != "7B" else ""
    return tuple(Entry(task, table.mode, PUBLISHED_FLAGS.get((table.model, task, table.mode), flags.get(task, {})),
                       model) for task in tasks)


SUITES = {"qwen-7b-base": table_entries(published.BASE), "qwen-7b-chat": table_entries(published.CHAT)}
for _size, (_base, _chat, _long) in published.FAMILY.items():  # qwen-14b-base, qwen-72b-chat, ...
    SUITES[f"qwen-{_size.lower()}-base"] = table_entries(_base)
    SUITES[f"qwen-{_size.lower()}-chat"] = table_entries(_chat)
# Every published accuracy and perplexity table; the speed table (profile) wants a GPU, so it is run alone.
SUITES["all"] = (SUITES["qwen-7b-base"] + table_entries(published.LONG_PPL) + SUITES["qwen-7b-chat"]
                 + (Entry("tooluse", "chat"),))


def expand(names: list[str], mode: str) -> list[Entry]:
    """Suite names become their entries; a plain task name runs in `mode`. Repeats are dropped."""
    entries = []
    for name in names:
        for entry in SUITES.get(name, (Entry(name, mode),)):
            if entry not in entries:
                entries.append(entry)
    return entries
