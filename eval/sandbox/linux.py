"""Linux interfaces the launcher needs: constants from include/uapi, libc calls, the seccomp filter.

The filter follows Docker's default profile where it matters for a single untrusted program:
no sockets, no ptrace or cross-process memory access, no kernel keyring, no new namespaces
(unshare, setns, clone with CLONE_NEW* flags; clone3 answers ENOSYS so libc falls back to clone,
whose flags a classic-BPF filter can read), no mounts, no bpf/perf/userfaultfd, no io_uring or AIO
contexts (host-wide pools), no queued signals, and no ordinary signals to the harness, the launcher or every process at once.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import resource
import struct

# unshare / clone flags
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x02000000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
CLONE_NEW_ANY = CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET
# mount
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    0x1, 0x2, 0x4, 0x8, 0x20, 0x1000, 0x4000, 0x40000)
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, AT_FDCWD, AT_RECURSIVE = 0x1, 0x2, 0x4, -100, 0x8000
MNT_DETACH = 2
MOUNT_SETATTR = 442  # the same number on x86_64 and aarch64
# prctl
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 22, 36, 38
# keyctl: give the program a fresh, empty session keyring instead of the harness's
KEYCTL_JOIN_SESSION_KEYRING = 1
# Landlock (include/uapi/linux/landlock.h): the same numbers on x86_64 and aarch64
LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION, LANDLOCK_RULE_PATH_BENEATH = 1, 1
READ_FILE, READ_DIR, WRITE_FILE = 1 << 2, 1 << 3, 1 << 1
FILE_ACCESS = 1 << 0 | 1 << 1 | 1 << 2 | 1 << 14 | 1 << 15  # execute, write, read, truncate, ioctl_dev
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2
# seccomp / classic BPF
SECCOMP_MODE_FILTER, SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 2, 0x7FFF0000, 0x00050000
BPF_LOAD, BPF_JEQ, BPF_JGE, BPF_JSET, BPF_RETURN = 0x20, 0x15, 0x35, 0x45, 0x06  # ld [k]; jeq/jge/jset #k; ret #k
ARCH_OFFSET, NR_OFFSET, ARG0_OFFSET = 4, 0, 16   # struct seccomp_data (little endian; low half of arg 0)
X32_SYSCALL_BIT = 0x40000000

# System call numbers (x86_64, aarch64): asm/unistd_64.h and asm-generic/unistd.h.
_SHARED_NUMBERS = dict(io_uring_setup=425, pidfd_send_signal=424, pidfd_open=434, clone3=435, open_tree=428,
                       move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433)
SYSCALLS = {
    "x86_64": dict(_SHARED_NUMBERS, audit_arch=0xC000003E, socket=41, ptrace=101, process_vm_readv=310, io_setup=206,
                   process_vm_writev=311, tkill=200, unshare=272, setns=308, kill=62, tgkill=234, clone=56,
                   add_key=248, request_key=249, keyctl=250, rt_sigqueueinfo=129, rt_tgsigqueueinfo=297,
                   mount=165, umount2=166, pivot_root=155, bpf=321, perf_event_open=298, userfaultfd=323),
    "aarch64": dict(_SHARED_NUMBERS, audit_arch=0xC00000B7, socket=198, ptrace=117, process_vm_readv=270, io_setup=0,
                    process_vm_writev=271, tkill=130, unshare=97, setns=268, kill=129, tgkill=131, clone=220,
                    add_key=217, request_key=218, keyctl=219, rt_sigqueueinfo=138, rt_tgsigqueueinfo=240,
                    mount=40, umount2=39, pivot_root=41, bpf=280, perf_event_open=241, userfaultfd=282),
}
DENIED_SYSCALLS = (
    "socket", "ptrace", "process_vm_readv", "process_vm_writev", "io_setup", "io_uring_setup", "pidfd_send_signal", "tkill",
    "unshare", "setns", "add_key", "request_key", "keyctl", "rt_sigqueueinfo", "rt_tgsigqueueinfo",
    "mount", "umount2", "pivot_root", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
    "bpf", "perf_event_open", "userfaultfd",
)


@functools.cache
def libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def check_libc(what: str, result: int) -> None:
    if result < 0:  # these calls return -1 and set errno on failure
        number = ctypes.get_errno()
        raise OSError(number, f"{what}: {os.strerror(number)}")


def prctl(option: int, value: int) -> None:
    check_libc(f"prctl {option}", libc().prctl(option, ctypes.c_ulong(value), 0, 0, 0))


def set_limits(limits: list[tuple[int, int, int]]) -> None:
    """(resource, soft, hard) each; never above the hard limit already in force, which an unprivileged
    process cannot raise."""
    for which, soft, hard in limits:
        allowed = resource.getrlimit(which)[1]
        if allowed != resource.RLIM_INFINITY:
            soft, hard = min(soft, allowed), min(hard, allowed)
        resource.setrlimit(which, (soft, hard))


def mount(source: str, target: str, fstype: str, flags: int, options: str | None) -> None:
    result = libc().mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags),
                          options.encode() if options else None)
    check_libc(f"mount {target}", result)


def set_mount_attributes(path: str, attributes: int, propagation: int = 0) -> None:
    """mount_setattr on the mount at `path` and every mount below it."""
    settings = (ctypes.c_uint64 * 4)(attributes, 0, propagation, 0)
    check_libc("mount_setattr", libc().syscall(
        ctypes.c_long(MOUNT_SETATTR), ctypes.c_long(AT_FDCWD), path.encode(), ctypes.c_long(AT_RECURSIVE),
        settings, ctypes.c_long(ctypes.sizeof(settings))))


def unshare(flags: int) -> None:
    check_libc("unshare", libc().unshare(flags))


def pivot_root_here() -> None:
    """The current directory becomes / and the old root is detached (pivot_root(".", "."))."""
    check_libc("pivot_root", libc().syscall(ctypes.c_long(SYSCALLS[platform.machine()]["pivot_root"]), b".", b"."))
    check_libc("umount2", libc().umount2(b".", MNT_DETACH))


def landlock_abi() -> int:
    """The Landlock ABI version this kernel offers; 0 where it offers none."""
    return max(0, libc().syscall(ctypes.c_long(LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                                 ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION)))


def restrict_filesystem(rules: list[tuple[int, int]]) -> None:
    """Landlock: from now on this process and its children may reach only what `rules` allow, each an
    (O_PATH descriptor, access rights) pair, closed here; with ABI 6, no signals to processes outside
    the domain and no abstract unix sockets either. Sets no_new_privs."""
    abi = landlock_abi()
    handled = (1 << 13) - 1 | (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0) | (1 << 15 if abi >= 5 else 0)
    fields = [handled, 0] + ([SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL] if abi >= 6 else [])
    attributes = ctypes.create_string_buffer(struct.pack(f"{len(fields)}Q", *fields))
    ruleset = libc().syscall(ctypes.c_long(LANDLOCK_CREATE_RULESET), attributes, ctypes.c_size_t(len(attributes.raw)),
                             ctypes.c_uint32(0))
    check_libc("landlock_create_ruleset", ruleset)
    try:
        for fd, access in rules:
            rule = ctypes.create_string_buffer(struct.pack("=Qi", access & handled, fd))
            check_libc("landlock_add_rule", libc().syscall(ctypes.c_long(LANDLOCK_ADD_RULE), ctypes.c_int(ruleset),
                                                           ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), rule, ctypes.c_uint32(0)))
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        check_libc("landlock_restrict_self", libc().syscall(ctypes.c_long(LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset),
                                                             ctypes.c_uint32(0)))
    finally:
        for fd in (ruleset, *(fd for fd, _ in rules)):
            os.close(fd)


def join_new_session_keyring() -> None:
    check_libc("keyctl", libc().syscall(ctypes.c_long(SYSCALLS[platform.machine()]["keyctl"]),
                                        ctypes.c_long(KEYCTL_JOIN_SESSION_KEYRING), None))


def drop_capabilities() -> None:
    """Non-root namespace mode: give up the capabilities the new user namespace granted."""
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = ctypes.create_string_buffer(24)     # two empty __user_cap_data_struct
    check_libc("capset", libc().capset(header, data))


def install_syscall_filter(protected_pids: list[int]) -> None:
    """Sets no_new_privs (setuid binaries grant nothing) and the seccomp filter below."""
    numbers = SYSCALLS.get(platform.machine())
    if numbers is None:
        raise OSError(f"no seccomp filter for the {platform.machine()} architecture")
    program = seccomp_program(numbers, protected_pids)
    instructions = b"".join(struct.pack("HBBI", *instruction) for instruction in program)
    buffer = ctypes.create_string_buffer(instructions)
    fprog = struct.pack("HxxxxxxP", len(program), ctypes.addressof(buffer))  # struct sock_fprog
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    check_libc("seccomp", libc().prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, fprog, 0, 0))


def seccomp_program(numbers: dict[str, int], protected_pids: list[int]) -> list[tuple[int, int, int, int]]:
    """A classic-BPF filter as (code, jump if true, jump if false, k) with symbolic labels."""
    targets = [pid & 0xFFFFFFFF for pid in protected_pids]
    kill_targets = targets + [-pid & 0xFFFFFFFF for pid in protected_pids] + [0xFFFFFFFF]
    source: list = [
        (BPF_LOAD, ARCH_OFFSET, None, None),
        (BPF_JEQ, numbers["audit_arch"], None, "deny"),   # 32-bit syscall ABI: deny everything
        (BPF_LOAD, NR_OFFSET, None, None),
        (BPF_JGE, X32_SYSCALL_BIT, "deny", None),
        *[(BPF_JEQ, numbers[name], "deny", None) for name in DENIED_SYSCALLS],
        (BPF_JEQ, numbers["clone3"], "no clone3", None),  # its flags sit in memory a filter cannot read
        (BPF_JEQ, numbers["clone"], None, "after clone"),
        (BPF_LOAD, ARG0_OFFSET, None, None),
        (BPF_JSET, CLONE_NEW_ANY, "deny", None),
        (BPF_RETURN, SECCOMP_RET_ALLOW, None, None),
        "after clone",
    ]
    for name, denied_targets in (("kill", kill_targets), ("tgkill", targets), ("pidfd_open", targets)):
        source += [
            (BPF_JEQ, numbers[name], None, f"after {name}"),
            (BPF_LOAD, ARG0_OFFSET, None, None),
            *[(BPF_JEQ, value, "deny", None) for value in denied_targets],
            (BPF_RETURN, SECCOMP_RET_ALLOW, None, None),
            f"after {name}",
        ]
    source += [(BPF_RETURN, SECCOMP_RET_ALLOW, None, None),
               "deny", (BPF_RETURN, SECCOMP_RET_ERRNO | errno.EPERM, None, None),
               "no clone3", (BPF_RETURN, SECCOMP_RET_ERRNO | errno.ENOSYS, None, None)]
    return _assemble(source)


def _assemble(source: list) -> list[tuple[int, int, int, int]]:
    labels, instructions = {}, []
    for item in source:
        if isinstance(item, str):
            labels[item] = len(instructions)
        else:
            instructions.append(item)

    def offset(label: str | None, index: int) -> int:
        jump = 0 if label is None else labels[label] - index - 1
        if not 0 <= jump <= 255:  # classic BPF jumps are one unsigned byte
            raise ValueError(f"seccomp filter: jump to {label!r} out of range")
        return jump

    return [(code, offset(if_true, index), offset(if_false, index), k)
            for index, (code, k, if_true, if_false) in enumerate(instructions)]
