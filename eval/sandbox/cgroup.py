"""A memory cgroup around one program and everything it starts, so that the kernel enforces the total.

cgroup v2 `memory.max` where the unified hierarchy offers the memory controller, else cgroup v1
`memory.limit_in_bytes`. Creating one needs root; where neither hierarchy can be written there is no
cgroup and the launcher's polled limit (launcher._wait_within_memory) stands alone. The polled limit
runs in either case: it names the limit in the program's outcome before the kernel has to act.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
GROUP = "qwen-eval-sandbox"  # every program's cgroup sits below this one


class MemoryCgroup:
    def __init__(self, path: Path, version: int):
        self.path, self.version = path, version

    @classmethod
    def create(cls, name: str, limit: int) -> "MemoryCgroup | None":
        for make in (cls._v2, cls._v1):
            with contextlib.suppress(OSError, ValueError):
                group = make(name, limit)
                if group is not None:
                    return group
        return None

    @classmethod
    def _v2(cls, name: str, limit: int) -> "MemoryCgroup | None":
        if "memory" not in (ROOT / "cgroup.controllers").read_text().split():
            return None
        parent = ROOT / GROUP
        parent.mkdir(exist_ok=True)
        (ROOT / "cgroup.subtree_control").write_text("+memory")
        (parent / "cgroup.subtree_control").write_text("+memory")
        path = parent / name
        path.mkdir()
        (path / "memory.max").write_text(str(limit))
        with contextlib.suppress(OSError):
            (path / "memory.swap.max").write_text("0")
        return cls(path, 2)

    @classmethod
    def _v1(cls, name: str, limit: int) -> "MemoryCgroup | None":
        base = ROOT / "memory"
        if not (base / "memory.limit_in_bytes").exists():
            return None
        path = base / GROUP / name
        path.mkdir(parents=True)
        (path / "memory.limit_in_bytes").write_text(str(limit))
        with contextlib.suppress(OSError):  # swap accounting is optional
            (path / "memory.memsw.limit_in_bytes").write_text(str(limit))
        return cls(path, 1)

    def enter(self) -> None:
        """Move this process in: what it forks from now on is counted here."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def killed_for_memory(self) -> bool:
        """True once the kernel killed a member for going over the limit."""
        with contextlib.suppress(OSError, ValueError):
            name = "memory.events" if self.version == 2 else "memory.oom_control"
            counters = dict(line.split() for line in (self.path / name).read_text().splitlines())
            return int(counters.get("oom_kill", 0)) > 0
        return False

    def describe(self, limit: int) -> str:
        setting = "memory.max" if self.version == 2 else "memory.limit_in_bytes"
        return f"cgroup v{self.version} {setting} = {limit / 2**30:g} GiB for the program and its children"


_PENDING: set[Path] = set()  # groups whose last processes were still being reaped


def remove(name: str) -> bool:
    """Delete a program's group once its processes are gone; True if the kernel killed one of them
    for the group's limit (whichever it picked: the program, a child, or the launcher). The harness
    does it: inside the sandbox the mounts, /sys/fs/cgroup included, are read-only by then. Killed
    processes can take a moment to leave the group, so a busy group is retried for a second, then
    at the next call and at exit."""
    groups = [MemoryCgroup(path, version) for path, version in ((ROOT / GROUP / name, 2),
                                                                (ROOT / "memory" / GROUP / name, 1)) if path.is_dir()]
    killed = any(group.killed_for_memory() for group in groups)
    _PENDING.update(group.path for group in groups)
    for _ in range(10):
        if not _remove_pending():
            break
        time.sleep(0.1)
    return killed


def _remove_pending() -> bool:
    """True while some group is still busy."""
    for path in list(_PENDING):
        with contextlib.suppress(OSError):
            path.rmdir()
        if not path.is_dir():
            _PENDING.discard(path)
    return bool(_PENDING)


atexit.register(_remove_pending)


def probe(limit: int) -> str | None:
    """What create() would give on this machine, in words (None: no cgroup); leaves nothing behind."""
    group = MemoryCgroup.create(f"probe-{os.getpid()}", limit)
    if group is None:
        return None
    with contextlib.suppress(OSError):
        group.path.rmdir()
    return group.describe(limit)
