"""Sandboxed execution of model-written programs (HumanEval).

Each program runs in a fresh child process ("the launcher" is this file run as a script) that
isolates itself before the untrusted code starts:

* namespace mode (chosen when the kernel permits it): new network, PID, mount, IPC and UTS
  namespaces (plus a user namespace when not root); a read-only view of the file system with a
  private tmpfs working directory; home directories hidden; a fresh /proc.
* basic mode (fallback): no namespaces.
* always: a dedicated unprivileged uid per worker when running as root, resource limits, a
  seccomp filter (no socket creation, no ptrace, no signals to the harness), a minimal
  environment, stdin from /dev/null, captured and capped output, and a wall-clock timeout after
  which the whole program (its process group, namespace or uid) is killed.

Success is proven positively: the wrapper reports "passed" with a random per-run token, which
the program never receives through its globals, environment, argv or files, only after the
program (including ``check(...)``) returned in its original process.
See the "Code execution sandbox" section of EVALUATION.md for the threat model.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import functools
import json
import math
import os
import platform
import pwd
import queue
import resource
import secrets
import selectors
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import types
import warnings
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

OPT_IN_ENVIRONMENT_VARIABLE = "QWEN_EVAL_ALLOW_CODE_EXECUTION"
DEFAULT_TIMEOUT = 3.0
MESSAGE_LIMIT = 1000          # characters of an error message kept in an Outcome
OUTPUT_LIMIT = 64 * 1024      # bytes of stdout / stderr kept while a program runs
RESULT_LIMIT = 64 * 1024      # bytes read from the result pipe
SETUP_TIMEOUT = 30.0          # launcher start-up and isolation, before the program's clock starts
KILL_GRACE = 5.0              # for the launcher to kill and reap a timed-out program
DRAIN_GRACE = 1.0             # for the last output after the launcher exited

STATUSES = ("passed", "failed", "timed_out", "crashed")


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up; never caused by the program being run."""


class CodeExecutionRefused(PermissionError):
    """Executing model-written code was not explicitly allowed."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of every process of a program (the CPU limit follows from the timeout)."""

    memory_bytes: int = 4 * 1024**3      # RLIMIT_AS
    file_size_bytes: int = 16 * 1024**2  # RLIMIT_FSIZE
    open_files: int = 64                 # RLIMIT_NOFILE
    processes: int = 64                  # RLIMIT_NPROC above what the uid already runs (threads count)
    scratch_bytes: int = 64 * 1024**2    # size of the tmpfs working directory (namespace mode)


@dataclass(frozen=True)
class Outcome:
    """How one program ended. Durations differ between runs, so they are left out of ==."""

    status: str               # one of STATUSES
    error_type: str | None    # exception type name of a failure, e.g. "AssertionError"
    message: str | None       # capped; what failed, timed out or crashed
    duration: float = field(compare=False)  # seconds the program ran (after sandbox start-up)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

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
    """Which network isolation is in force: "netns" or "seccomp".

    "netns": a new network namespace with only a down loopback; "seccomp": socket creation is
    blocked. Socket creation is blocked by seccomp in both cases; the namespace is a second layer.
    """
    return "netns" if _isolation_plan().namespaces else "seccomp"


def isolation_summary() -> dict[str, str]:
    """What is in force on this machine, in words, for writing next to the results."""
    namespaces, root = _isolation_plan().namespaces, os.geteuid() == 0
    return {
        "mode": "namespaces" if namespaces else "basic",
        "network": network_isolation(),
        "user": "dedicated unprivileged uid per worker" if root else "the caller's uid",
        "processes": "PID namespace" if namespaces else (
            "killed by uid after each program" if root else "process group + subreaper (best effort)"),
        "filesystem": "read-only, private tmpfs working directory, homes hidden" if namespaces else (
            "cannot modify what the dedicated uid does not own" if root else "not isolated"),
    }


def run_programs(
    sources: Sequence[str],
    *,
    timeouts: float | Sequence[float] = DEFAULT_TIMEOUT,
    workers: int | None = None,
    progress: bool = False,
    limits: Limits = Limits(),
) -> list[Outcome]:
    """Run each source in its own sandbox; outcomes come back in input order.

    A source is a complete program, for HumanEval:
    prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})".
    """
    _require_consent()
    per_program = _timeouts_per_program(timeouts, len(sources))
    if not sources:
        return []
    workers = max(1, min(workers or len(os.sched_getaffinity(0)), len(sources)))
    namespaces = _isolation_plan().namespaces
    with _reserved_uids(workers) as uids, ThreadPoolExecutor(workers) as pool:
        free_uids: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        for uid in uids:
            free_uids.put(uid)

        def run(index: int) -> Outcome:
            uid = free_uids.get()
            try:
                return _run_one(_Job(sources[index], per_program[index], namespaces, uid, limits))
            finally:
                free_uids.put(uid)

        futures = [pool.submit(run, index) for index in range(len(sources))]
        try:
            _wait_for(futures, progress)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        return [future.result() for future in futures]


def calibrated_timeouts(
    canonical_sources: Sequence[str],
    factor: float = 4.0,
    min_time: float = 1.0,
    *,
    workers: int | None = None,
    calibration_timeout: float = 60.0,
) -> list[float]:
    """evalplus-style per-program timeouts: max(min_time, factor x the canonical's runtime).

    The runtime is measured in the sandbox, so it includes the same overheads a completion gets.
    """
    outcomes = run_programs(canonical_sources, timeouts=calibration_timeout, workers=workers)
    failing = [index for index, outcome in enumerate(outcomes) if outcome.status != "passed"]
    if failing:
        raise SandboxError(f"canonical solutions do not pass, cannot calibrate: indices {failing}")
    return [max(min_time, factor * outcome.duration) for outcome in outcomes]


def _require_consent() -> None:
    if not _opted_in:
        require_opt_in(False)


def _timeouts_per_program(timeouts: float | Sequence[float], count: int) -> list[float]:
    per_program = [float(timeouts)] * count if isinstance(timeouts, (int, float)) else list(timeouts)
    if len(per_program) != count:
        raise ValueError(f"got {len(per_program)} timeouts for {count} programs")
    if any(not timeout > 0 for timeout in per_program):
        raise ValueError("timeouts must be positive")
    return per_program


def _wait_for(futures: list[Future], progress: bool) -> None:
    """Raise the first error as soon as it happens; show a progress bar when asked."""
    if not progress:
        for future in as_completed(futures):
            future.result()
        return
    from tqdm import tqdm

    with tqdm(total=len(futures), desc="sandbox", unit="program") as bar:
        for future in as_completed(futures):
            future.result()
            bar.update()


# ----------------------------------------------------------------------------------------------
# Parent side: choosing the isolation, reserving uids, supervising one launcher
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Plan:
    namespaces: bool


@dataclass(frozen=True)
class _Job:
    source: str
    timeout: float
    namespaces: bool
    uid: int | None   # dedicated uid when the harness runs as root
    limits: Limits


@functools.cache
def _isolation_plan() -> _Plan:
    """Namespaces when a trivial program runs under them, else basic mode; never silently less."""
    errors = []
    with _reserved_uids(1) as [uid]:
        for plan in (_Plan(namespaces=True), _Plan(namespaces=False)):
            try:
                outcome = _run_one(_Job("pass", 10.0, plan.namespaces, uid, Limits()))
            except SandboxError as error:
                errors.append(str(error))
                continue
            if outcome.status == "passed":
                if not plan.namespaces and os.geteuid() != 0:
                    warnings.warn("code execution sandbox: no namespaces and not root, so programs run "
                                  "as your user without file system isolation (best effort)")
                return plan
            errors.append(f"probe program {outcome.status}: {outcome.message}")
    raise SandboxError("no sandbox can be set up on this machine: " + " | ".join(errors))


_UID_CANDIDATES = range(61000, 62000)


@contextlib.contextmanager
def _reserved_uids(count: int) -> Iterator[list[int | None]]:
    """Root: `count` unused uids, locked against other harness processes. Otherwise Nones."""
    if os.geteuid() != 0:
        yield [None] * count
        return
    lock_directory = _root_lock_directory()
    with contextlib.ExitStack() as locks:
        uids: list[int | None] = []
        for uid in filter(_is_unused_uid, _UID_CANDIDATES):
            lock = locks.enter_context(open(os.path.join(lock_directory, f"{uid}.lock"), "w"))
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            _kill_all_processes_of(uid)  # leftovers of a harness that died mid-run
            uids.append(uid)
            if len(uids) == count:
                yield uids
                return
    raise SandboxError(f"could not reserve {count} sandbox uids in {_UID_CANDIDATES}")


def _is_unused_uid(uid: int) -> bool:
    """No account owns it (its processes get killed) and this user namespace maps it."""
    try:
        pwd.getpwuid(uid)
        return False
    except KeyError:
        pass
    with open("/proc/self/uid_map") as uid_map:
        ranges = [tuple(map(int, line.split())) for line in uid_map]
    return any(inside <= uid < inside + length for inside, _, length in ranges)


def _root_lock_directory() -> str:
    """A directory only root can write to, so no sandboxed program can plant the lock files."""
    base = "/run" if os.path.isdir("/run") else tempfile.gettempdir()
    path = os.path.join(base, "qwen-eval-sandbox")
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o022:
        raise SandboxError(f"{path} must be a directory that only root can write to")
    return path


def _kill_all_processes_of(uid: int) -> None:
    """kill(-1) as that uid reaches every process it owns, including ones that left the group."""
    subprocess.run(
        ["/bin/sh", "-c", "kill -KILL -1"], user=uid, group=uid, extra_groups=[], env={}, cwd="/",
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30,
    )


def _run_one(job: _Job) -> Outcome:
    workdir = tempfile.mkdtemp(prefix="qwen-sandbox-")
    try:
        if job.uid is not None:
            os.chown(workdir, job.uid, job.uid)
        token = secrets.token_hex(16)
        observation = _supervise(job, workdir, token)
    finally:
        _remove_tree(workdir)
    return _classify(observation, token, job.timeout)


def _remove_tree(path: str) -> None:
    try:
        shutil.rmtree(path)
    except OSError:  # the program revoked permissions inside its own directory (basic mode)
        os.chmod(path, 0o700)
        for directory, subdirectories, _ in os.walk(path):
            for name in subdirectories:
                if not os.path.islink(os.path.join(directory, name)):
                    os.chmod(os.path.join(directory, name), 0o700)
        shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class _LaunchRequest:
    """Everything the launcher needs; sent through its stdin, never argv or the environment."""

    source: str
    token: str
    workdir: str
    result_fd: int
    namespaces: bool
    uid: int | None
    limits: Limits
    cpu_seconds: int
    protected_pids: list[int]     # the harness, its process group and the launcher
    hidden_directories: list[str]  # covered by an empty tmpfs in namespace mode

    @classmethod
    def from_json(cls, text: bytes) -> _LaunchRequest:
        fields = json.loads(text)
        return cls(**{**fields, "limits": Limits(**fields["limits"])})


def _launch(job: _Job, workdir: str, token: str, result_write: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-s", "-P", "-B", os.path.abspath(__file__)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        pass_fds=(result_write,), cwd=workdir, env=_program_environment(workdir),
        start_new_session=True,
    )
    request = _LaunchRequest(
        source=job.source, token=token, workdir=workdir, result_fd=result_write,
        namespaces=job.namespaces, uid=job.uid, limits=job.limits,
        cpu_seconds=math.ceil(job.timeout) + 1,
        protected_pids=sorted({os.getpid(), os.getpgrp(), process.pid}),
        hidden_directories=_private_directories(),
    )
    with contextlib.suppress(BrokenPipeError):  # a launcher that died at start-up: see its stderr
        with process.stdin:
            process.stdin.write(json.dumps(dataclasses.asdict(request)).encode())
    return process


def _program_environment(workdir: str) -> dict[str, str]:
    """Nothing inherited: no tokens, no proxies, no PYTHONPATH. A fixed hash seed keeps runs equal."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
        "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8",
    }


def _private_directories() -> list[str]:
    homes = {"/home", "/root", os.path.expanduser("~")}
    with contextlib.suppress(KeyError):  # a uid without a passwd entry (some containers)
        homes.add(pwd.getpwuid(os.geteuid()).pw_dir)
    return sorted(path for path in homes if path != "/" and os.path.isdir(path))


@dataclass
class _Observation:
    records: _RecordStream
    returncode: int
    timed_out: bool
    duration: float
    stderr: bytes
    stdout: bytes


def _supervise(job: _Job, workdir: str, token: str) -> _Observation:
    result_read, result_write = os.pipe()
    try:
        process = _launch(job, workdir, token, result_write)
    except BaseException:
        os.close(result_read)
        raise
    finally:
        os.close(result_write)
    supervision = _Supervision(process, result_read)
    try:
        supervision.wait_for_start()
        deadline = supervision.started_at + job.timeout
        timed_out = not supervision.pump(lambda: supervision.exited, deadline)
        if timed_out:
            supervision.stop(job.uid)
        supervision.pump(lambda: supervision.open_pipes == 0, time.monotonic() + DRAIN_GRACE)
    except BaseException:
        supervision.stop(job.uid)
        raise
    finally:
        supervision.close()
    return _Observation(
        supervision.records, process.returncode, timed_out, supervision.duration,
        supervision.stderr.data, supervision.stdout.data,
    )


class _Tail:
    """The last `limit` bytes written to a pipe; everything before is read and dropped."""

    def __init__(self, limit: int):
        self.limit, self.data = limit, b""

    def append(self, chunk: bytes) -> None:
        self.data = (self.data + chunk)[-self.limit:]


class _RecordStream:
    """JSON lines from the result pipe. Only what follows the wrapper's "started" record can come
    from the program; a program can forge failures but not a pass (it lacks the token)."""

    def __init__(self, limit: int):
        self.remaining, self.pending = limit, b""
        self.records: list[dict] = []
        self.start: int | None = None  # index of the first "started" record

    @property
    def started(self) -> bool:
        return self.start is not None

    def feed(self, chunk: bytes) -> None:
        chunk = chunk[: self.remaining]
        self.remaining -= len(chunk)
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        for line in lines:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    if record.get("kind") == "started" and self.start is None:
                        self.start = len(self.records)
                    self.records.append(record)

    def setup_error(self) -> str | None:
        before_start = self.records[: self.start]  # [:None] is everything
        errors = [record.get("message") for record in before_start if record.get("kind") == "setup_error"]
        return str(errors[0]) if errors else None

    def after_start(self, kind: str) -> list[dict]:
        if self.start is None:
            return []
        return [record for record in self.records[self.start + 1:] if record.get("kind") == kind]


class _Supervision:
    """Reads a launcher's pipes and notices its exit without ever blocking past a deadline."""

    def __init__(self, process: subprocess.Popen, result_read: int):
        self.process, self.selector = process, selectors.DefaultSelector()
        self.stdout, self.stderr = _Tail(OUTPUT_LIMIT), _Tail(OUTPUT_LIMIT)
        self.records = _RecordStream(RESULT_LIMIT)
        self.result_read, self.pidfd = result_read, os.pidfd_open(process.pid)
        self.open_pipes, self.exited = 3, False
        self.started_at: float | None = None
        self.finished_at: float | None = None
        for fd, sink in ((process.stdout.fileno(), self.stdout.append),
                         (process.stderr.fileno(), self.stderr.append), (result_read, self._on_result)):
            self.selector.register(fd, selectors.EVENT_READ, functools.partial(self._read, sink))
        self.selector.register(self.pidfd, selectors.EVENT_READ, self._on_exit)

    @property
    def duration(self) -> float:
        return (self.finished_at or time.monotonic()) - (self.started_at or time.monotonic())

    def pump(self, done: Callable[[], bool], deadline: float) -> bool:
        """Handle pipe data and exit events until done() (True) or the deadline (False)."""
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            for key, _ in self.selector.select(remaining):
                key.data(key.fd)
        return True

    def wait_for_start(self) -> None:
        started = self.pump(lambda: self.started_at is not None or self.exited,
                            time.monotonic() + SETUP_TIMEOUT)
        if self.started_at is not None:
            return
        if not started:
            raise SandboxError(f"sandbox set-up did not finish within {SETUP_TIMEOUT:g} s")
        reason = self.records.setup_error() or self.stderr.data.decode(errors="replace")[-MESSAGE_LIMIT:]
        raise SandboxError(f"sandbox set-up failed: {reason}")

    def stop(self, uid: int | None) -> None:
        """Ask the launcher to kill the program; kill the launcher too if it does not manage."""
        self._mark_finished()
        if self.exited:
            return
        self.process.send_signal(signal.SIGTERM)
        if self.pump(lambda: self.exited, time.monotonic() + KILL_GRACE):
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.exited = True
        if uid is not None:
            _kill_all_processes_of(uid)

    def close(self) -> None:
        self.selector.close()
        for closable in (self.process.stdout, self.process.stderr):
            closable.close()
        os.close(self.result_read)
        os.close(self.pidfd)

    def _read(self, sink: Callable[[bytes], None], fd: int) -> None:
        chunk = os.read(fd, 65536)
        if chunk:
            sink(chunk)
        else:
            self.selector.unregister(fd)
            self.open_pipes -= 1

    def _on_result(self, chunk: bytes) -> None:
        self.records.feed(chunk)
        if self.started_at is None and self.records.started:
            self.started_at = time.monotonic()
        if self.records.after_start("passed") or self.records.after_start("failed"):
            self._mark_finished()

    def _on_exit(self, fd: int) -> None:
        self.selector.unregister(fd)
        self.process.wait()
        self.exited = True
        self._mark_finished()

    def _mark_finished(self) -> None:
        if self.finished_at is None:
            self.finished_at = time.monotonic()


def _classify(observation: _Observation, token: str, timeout: float) -> Outcome:
    """A pass needs the token; otherwise timeout, reported failure, signal, plain exit."""
    records, duration = observation.records, observation.duration
    if any(record.get("token") == token for record in records.after_start("passed")):
        return Outcome("passed", None, None, duration)
    if observation.timed_out:
        return Outcome("timed_out", None, f"exceeded the {timeout:g} s wall-clock limit", duration)
    failures = records.after_start("failed")
    if failures:
        error_type, message = failures[-1].get("error_type"), failures[-1].get("message")
        return Outcome("failed", _capped(error_type, 100), _capped(message, MESSAGE_LIMIT), duration)
    output = observation.stderr or observation.stdout
    code = observation.returncode
    if code < 0 and -code == signal.SIGXCPU:
        return Outcome("timed_out", None, "exceeded the CPU time limit", duration)
    if code < 0:
        killed = f"killed by {_signal_name(-code)}"
        return Outcome("crashed", None, _explained(killed, output), duration)
    exited = f"exited with code {code} before the checks finished"
    return Outcome("failed", None, _explained(exited, output), duration)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # real-time signals have no name
        return f"signal {number}"


def _explained(what: str, output: bytes) -> str:
    """`what`, followed by as much of the program's last output as fits in a message."""
    tail = output.decode(errors="replace").strip()
    return f"{what}: {tail[-(MESSAGE_LIMIT - len(what) - 2):]}" if tail else what


def _capped(text: object, limit: int) -> str | None:
    if text is None:
        return None
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# Launcher side: runs as `python eval/sandbox.py`, isolates a child, runs the program in it
# ----------------------------------------------------------------------------------------------

_PROGRAM_FILENAME = "<program>"
_SANDBOX_FAILED = 125

# Linux constants (include/uapi): unshare flags, mount flags, prctl options, seccomp/BPF.
_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_PRIVATE = 0x2, 0x4, 0x8, 0x40000
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _AT_FDCWD, _AT_RECURSIVE = 0x1, 0x2, -100, 0x8000
_PR_SET_PDEATHSIG, _PR_SET_SECCOMP, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 22, 36, 38
_SECCOMP_MODE_FILTER, _SECCOMP_RET_ALLOW, _SECCOMP_RET_ERRNO = 2, 0x7FFF0000, 0x00050000
_BPF_LOAD, _BPF_JEQ, _BPF_JGE, _BPF_RETURN = 0x20, 0x15, 0x35, 0x06   # ld [k]; jeq/jge #k; ret #k
_ARCH_OFFSET, _NR_OFFSET, _ARG0_OFFSET = 4, 0, 16   # struct seccomp_data (little endian)
_X32_SYSCALL_BIT = 0x40000000

# Syscall numbers (x86_64, aarch64); mount_setattr is 442 on both.
_SYSCALLS = {
    "x86_64": dict(audit_arch=0xC000003E, socket=41, ptrace=101, process_vm_readv=310,
                   process_vm_writev=311, io_uring_setup=425, pidfd_send_signal=424, tkill=200,
                   unshare=272, setns=308, kill=62, tgkill=234, pidfd_open=434),
    "aarch64": dict(audit_arch=0xC00000B7, socket=198, ptrace=117, process_vm_readv=270,
                    process_vm_writev=271, io_uring_setup=425, pidfd_send_signal=424, tkill=130,
                    unshare=97, setns=268, kill=129, tgkill=131, pidfd_open=434),
}
_DENIED_SYSCALLS = ("socket", "ptrace", "process_vm_readv", "process_vm_writev", "io_uring_setup",
                    "pidfd_send_signal", "tkill", "unshare", "setns")
_MOUNT_SETATTR = 442


def _launcher_main() -> None:
    """Supervisor of one program: isolate, fork, wait, clean up, exit the way the program did."""
    request = _LaunchRequest.from_json(sys.stdin.buffer.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # the harness died: take everything down
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)          # escaped orphans come back here to be killed
    reporter = _Reporter(request.result_fd)
    if request.namespaces:
        try:
            _enter_namespaces()
        except OSError as error:
            reporter.send(kind="setup_error", message=f"namespaces: {error}")
            os._exit(_SANDBOX_FAILED)
    _exit_like(_supervise_program(request, reporter))


class _Reporter:
    def __init__(self, fd: int):
        self.fd = fd

    def send(self, **record: object) -> None:
        data = (json.dumps(record) + "\n").encode()
        while data:
            data = data[os.write(self.fd, data):]


def _supervise_program(request: _LaunchRequest, reporter: _Reporter) -> int:
    """Fork the program (behind a PID-namespace init in namespace mode); returns its wait status."""
    relay = os.pipe() if request.namespaces else None
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # until the handler knows the child
    if relay:
        child = _fork(lambda: _run_init(request, reporter, relay))
    else:
        child = _fork(lambda: _run_program_process(request, reporter))
    signal.signal(signal.SIGTERM, lambda *_: _kill_tree(child))  # the harness's timeout
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    if relay:
        os.close(relay[1])
    _, status = os.waitpid(child, 0)
    if relay:
        relayed = os.read(relay[0], 64)
        status = int(relayed) if relayed else status
    _clean_up(child, request)
    return status


def _run_init(request: _LaunchRequest, reporter: _Reporter, relay: tuple[int, int]) -> None:
    """PID 1 of the namespace: its exit kills every process in it. The program runs as PID 2,
    so signals it sends itself behave as usual (PID 1 ignores them)."""
    os.close(relay[0])
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    def program_main() -> None:
        os.close(relay[1])
        _run_program_process(request, reporter)

    _, status = os.waitpid(_fork(program_main), 0)
    os.write(relay[1], str(status).encode())
    os._exit(0)


def _run_program_process(request: _LaunchRequest, reporter: _Reporter) -> None:
    try:
        _isolate(request)
    except BaseException as error:
        reporter.send(kind="setup_error", message=f"{type(error).__name__}: {error}")
        os._exit(_SANDBOX_FAILED)
    reporter.send(kind="started")
    _execute_untrusted(request.source, request.token, reporter)


def _fork(child_main: Callable[[], None]) -> int:
    """fork(); the child runs child_main (which ends in os._exit) and never returns to our code."""
    pid = os.fork()
    if pid == 0:
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, ())
            child_main()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(_SANDBOX_FAILED)
    return pid


def _kill_tree(pid: int) -> None:
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(pid, signal.SIGKILL)


def _clean_up(child: int, request: _LaunchRequest) -> None:
    """Nothing of the program may outlive it: its group, its uid and its files in the shared
    temporary directories (basic mode), the children left to us."""
    _kill_tree(child)
    if request.uid is not None and not request.namespaces:
        _kill_processes_of_uid(request.uid)
        _remove_files_of_uid(request.uid, keep=request.workdir)
    _kill_and_reap_children()


def _kill_processes_of_uid(uid: int) -> None:
    def helper_main() -> None:
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)  # every process of the uid except this helper
        os._exit(0)

    os.waitpid(_fork(helper_main), 0)


_SHARED_WRITABLE_DIRECTORIES = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


def _remove_files_of_uid(uid: int, keep: str) -> None:
    """Basic mode leaves the world-writable directories writable; the program is dead by now.
    `keep` is the working directory, which the harness removes."""
    for directory in filter(os.path.isdir, _SHARED_WRITABLE_DIRECTORIES):
        for entry in os.scandir(directory):
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_uid != uid or entry.path == keep:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)  # never follows symlinks
                else:
                    os.unlink(entry.path)


def _kill_and_reap_children() -> None:
    """Orphans of the program were reparented to us (subreaper): kill them until none is left."""
    while True:
        for pid in _child_pids():
            _kill_tree(pid)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _child_pids() -> list[int]:
    children = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/stat") as stat_file:
                fields = stat_file.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == os.getpid():
                children.append(int(entry))
    return children


def _exit_like(status: int) -> None:
    """Exit with the program's exit code, or die of the same signal."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        with contextlib.suppress(OSError, ValueError):
            signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
        os._exit(128 + number)
    os._exit(os.waitstatus_to_exitcode(status))


# -- isolation steps ---------------------------------------------------------------------------

def _isolate(request: _LaunchRequest) -> None:
    """Order matters: mounts need privileges, the uid change clears the parent-death signal, and
    import directories are opened while they are still reachable."""
    os.setpgid(0, 0)
    import_directories = _open_import_directories()
    program_uid = request.uid if request.uid is not None else os.getuid()
    process_limit = _count_processes_of(program_uid) + request.limits.processes
    if request.namespaces:
        _build_private_filesystem(request)
    os.chdir(request.workdir)
    if request.uid is not None:
        os.setgroups([])
        os.setresgid(request.uid, request.uid, request.uid)
        os.setresuid(request.uid, request.uid, request.uid)
    elif request.namespaces:
        _drop_capabilities()
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    _apply_limits(request.limits, request.cpu_seconds, process_limit)
    _install_syscall_filter(request.protected_pids)
    _reroute_imports(import_directories)


def _enter_namespaces() -> None:
    """New network/PID/mount/IPC/UTS namespaces; as non-root inside a user namespace that maps
    only our own uid and gid. The PID namespace applies to the children forked next."""
    uid, gid = os.getuid(), os.getgid()
    flags = _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWIPC | _CLONE_NEWUTS
    if uid != 0:
        flags |= _CLONE_NEWUSER
    _check_libc("unshare", _libc().unshare(flags))
    if uid != 0:
        mappings = {"setgroups": "deny", "uid_map": f"{uid} {uid} 1", "gid_map": f"{gid} {gid} 1"}
        for name, content in mappings.items():  # setgroups first: unprivileged gid_map needs it
            with open(f"/proc/self/{name}", "w") as mapping:
                mapping.write(content)


def _build_private_filesystem(request: _LaunchRequest) -> None:
    """Everything read-only and private to this mount namespace; a fresh /proc that shows only
    the sandbox; empty homes; a size-limited tmpfs as working directory and /dev/shm."""
    attributes = (ctypes.c_uint64 * 4)(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, _MS_PRIVATE, 0)
    _check_libc("mount_setattr", _libc().syscall(
        ctypes.c_long(_MOUNT_SETATTR), ctypes.c_long(_AT_FDCWD), b"/", ctypes.c_long(_AT_RECURSIVE),
        attributes, ctypes.c_long(ctypes.sizeof(attributes))))
    _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None)
    for directory in request.hidden_directories:
        _mount("tmpfs", directory, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=64k,mode=0755")
    os.makedirs(request.workdir, exist_ok=True)  # it may sit inside a hidden home
    owner = request.uid if request.uid is not None else os.getuid()
    group = request.uid if request.uid is not None else os.getgid()
    scratch = f"size={request.limits.scratch_bytes},uid={owner},gid={group}"
    _mount("tmpfs", request.workdir, "tmpfs", _MS_NOSUID | _MS_NODEV, f"{scratch},mode=0700")
    if os.path.isdir("/dev/shm"):
        _mount("tmpfs", "/dev/shm", "tmpfs", _MS_NOSUID | _MS_NODEV, f"{scratch},mode=1777")


def _mount(source: str, target: str, fstype: str, flags: int, options: str | None) -> None:
    result = _libc().mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags),
                           options.encode() if options else None)
    _check_libc(f"mount {target}", result)


def _drop_capabilities() -> None:
    """Non-root namespace mode: give up the capabilities the new user namespace granted."""
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = ctypes.create_string_buffer(24)     # two empty __user_cap_data_struct
    _check_libc("capset", _libc().capset(header, data))


def _count_processes_of(uid: int) -> int:
    """RLIMIT_NPROC counts every process of the real uid, so the limit sits on top of these."""
    count = 0
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/status") as status:
                real_uid = next(line for line in status if line.startswith("Uid:")).split()[1]
            count += int(real_uid) == uid
    return count


def _apply_limits(limits: Limits, cpu_seconds: int, process_limit: int) -> None:
    """Hard limits equal soft ones (CPU: +1 s, so SIGXCPU comes first) and cannot be raised."""
    for which, *wanted in (
        (resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 1),
        (resource.RLIMIT_AS, limits.memory_bytes, limits.memory_bytes),
        (resource.RLIMIT_FSIZE, limits.file_size_bytes, limits.file_size_bytes),
        (resource.RLIMIT_NOFILE, limits.open_files, limits.open_files),
        (resource.RLIMIT_NPROC, process_limit, process_limit),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        allowed = resource.getrlimit(which)[1]  # an unprivileged process cannot go above it
        if allowed != resource.RLIM_INFINITY:
            wanted = [min(value, allowed) for value in wanted]
        resource.setrlimit(which, tuple(wanted))


def _install_syscall_filter(protected_pids: list[int]) -> None:
    """seccomp: no sockets (hence no network, no Unix sockets to desktop buses or docker), no
    ptrace or cross-process memory access, no io_uring, no new namespaces, no signals to the
    harness or the launcher or to every process at once (kill(-1)). Also sets no_new_privs, so
    setuid binaries grant nothing."""
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        raise OSError(f"no seccomp filter for the {platform.machine()} architecture")
    program = _seccomp_program(numbers, protected_pids)
    instructions = b"".join(struct.pack("HBBI", *instruction) for instruction in program)
    buffer = ctypes.create_string_buffer(instructions)
    fprog = struct.pack("HxxxxxxP", len(program), ctypes.addressof(buffer))  # struct sock_fprog
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    _check_libc("seccomp", _libc().prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, fprog, 0, 0))


def _seccomp_program(numbers: dict[str, int], protected_pids: list[int]) -> list[tuple[int, int, int, int]]:
    """A classic-BPF filter as (code, jump if true, jump if false, k) with symbolic labels."""
    targets = [pid & 0xFFFFFFFF for pid in protected_pids]
    kill_targets = targets + [-pid & 0xFFFFFFFF for pid in protected_pids] + [0xFFFFFFFF]
    source: list = [
        (_BPF_LOAD, _ARCH_OFFSET, None, None),
        (_BPF_JEQ, numbers["audit_arch"], None, "deny"),   # 32-bit syscall ABI: deny everything
        (_BPF_LOAD, _NR_OFFSET, None, None),
        (_BPF_JGE, _X32_SYSCALL_BIT, "deny", None),
        *[(_BPF_JEQ, numbers[name], "deny", None) for name in _DENIED_SYSCALLS],
    ]
    for name, denied_targets in (("kill", kill_targets), ("tgkill", targets), ("pidfd_open", targets)):
        source += [
            (_BPF_JEQ, numbers[name], None, f"after {name}"),
            (_BPF_LOAD, _ARG0_OFFSET, None, None),
            *[(_BPF_JEQ, value, "deny", None) for value in denied_targets],
            (_BPF_RETURN, _SECCOMP_RET_ALLOW, None, None),
            f"after {name}",
        ]
    source += [(_BPF_RETURN, _SECCOMP_RET_ALLOW, None, None), "deny",
               (_BPF_RETURN, _SECCOMP_RET_ERRNO | 1, None, None)]  # EPERM
    return _assemble(source)


def _assemble(source: list) -> list[tuple[int, int, int, int]]:
    labels, instructions = {}, []
    for item in source:
        if isinstance(item, str):
            labels[item] = len(instructions)
        else:
            instructions.append(item)

    def offset(label: str | None, index: int) -> int:
        return 0 if label is None else labels[label] - index - 1

    return [(code, offset(if_true, index), offset(if_false, index), k)
            for index, (code, k, if_true, if_false) in enumerate(instructions)]


def _open_import_directories() -> dict[str, int]:
    """Opened while still privileged: the dedicated uid may not be allowed to traverse to the
    interpreter (e.g. /root/.pyenv), and namespace mode hides home directories."""
    return {entry: os.open(entry, os.O_PATH | os.O_DIRECTORY)
            for entry in dict.fromkeys(sys.path) if entry and os.path.isdir(entry)}


def _reroute_imports(directories: dict[str, int]) -> None:
    """Point sys.path and package __path__s at /proc/self/fd/N, which needs no path traversal."""
    def rerouted(path: str) -> str:
        for directory, fd in directories.items():
            if path == directory or path.startswith(directory + os.sep):
                return f"/proc/self/fd/{fd}{path[len(directory):]}"
        return path

    sys.path[:] = [rerouted(path) for path in sys.path]
    for module in list(sys.modules.values()):
        package_path = getattr(module, "__path__", None)
        if isinstance(package_path, list):
            package_path[:] = [rerouted(path) for path in package_path]
    sys.path_importer_cache.clear()


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check_libc(what: str, result: int) -> None:
    if result != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"{what}: {os.strerror(number)}")


def _prctl(option: int, value: int) -> None:
    _check_libc(f"prctl {option}", _libc().prctl(option, ctypes.c_ulong(value), 0, 0, 0))


# -- running the program -----------------------------------------------------------------------

def _execute_untrusted(source: str, token: str, reporter: _Reporter) -> None:
    """Run the program as __main__; report "passed" with the token only after it returned."""
    program_pid = os.getpid()
    main_module = types.ModuleType("__main__")
    sys.modules["__main__"], sys.argv = main_module, [_PROGRAM_FILENAME]
    try:
        exec(compile(source, _PROGRAM_FILENAME, "exec"), main_module.__dict__)
        record = {"kind": "passed", "token": token}
    except BaseException as error:  # SystemExit too: exiting before the checks is a failure
        record = {"kind": "failed", "error_type": type(error).__name__,
                  "message": _describe(error, source)}
    if os.getpid() == program_pid:  # a forked copy of the program must not report for it
        with contextlib.suppress(OSError):  # the program may have closed the result pipe
            reporter.send(**record)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    os._exit(0 if record["kind"] == "passed" else 1)


def _describe(error: BaseException, source: str) -> str:
    """The exception text, or for a bare `assert` the program line that failed."""
    try:
        text = str(error)
    except BaseException:
        text = "<unprintable exception>"
    if not text:
        lines = [line for frame, line in traceback.walk_tb(error.__traceback__)
                 if frame.f_code.co_filename == _PROGRAM_FILENAME]
        source_lines = source.splitlines()
        if lines and 0 < lines[-1] <= len(source_lines):
            text = source_lines[lines[-1] - 1].strip()
    return _capped(text, MESSAGE_LIMIT) or ""


if __name__ == "__main__":
    _launcher_main()
