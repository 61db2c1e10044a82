"""The trusted side of a judged run: `python -m eval.sandbox.checker` runs the dataset's check.

The harness sends one line {"check": source, "entry_point": name, "call_fd": n, "reply_fd": n,
"uid": n or null, "cpu_seconds": n, "memory_bytes": n} through stdin, outside the sandbox that runs
the candidate. No answer may teach the candidate anything about its verdict (samples could pass it on
through any side channel), so the check never reacts to an answer while the candidate runs:

1. recorded: `check` runs with its asserts made harmless and `entry_point` bound to a stand-in that
   returns a Wildcard, so it goes through every call it makes; each call's arguments are recorded;
2. all recorded calls are sent at once and the call pipe is closed; the candidate answers every one
   with plain data (wire.py) and its processes end;
3. replayed: once the harness closes stdin (the candidate's processes are gone), `check` runs for
   real against the recorded answers. A call the recording did not make (a check whose calls depend
   on earlier answers) ends the check with a checker error, never a pass.

One verdict record goes to stdout. Before it reads an answer, the checker gives up root (to the
`nobody` uid) and takes CPU-time and memory limits, since answers are hostile data.
"""
from __future__ import annotations

import ast
import builtins
import json
import os
import pwd
import random
import resource
import sys

from . import linux
from .wire import (
    RECORD_LIMIT,
    ProtocolError,
    Unencodable,
    decode_value,
    dump_record,
    encode_value,
    failure_record,
    load_record,
)

CHECK_FILENAME = "<check>"
CHECK_SEED = 0  # `random` is seeded alike before the recording and the replay, so both make the same calls


class CandidateGone(BaseException):
    """The candidate ended before answering a call. Not an Exception, so a check's `except
    Exception` cannot swallow it."""


class NotRecorded(BaseException):
    """The replayed check made a call that the recording did not make."""


class CandidateRaised(Exception):
    """Raised inside the check where the candidate raised; carries the candidate's type name."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type, self.message = error_type, message


class Wildcard:
    """What a recorded call returns: every comparison holds and every operation gives a Wildcard,
    so the check goes on to its next call."""

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return self

    def __getitem__(self, key):
        return self

    def __iter__(self):
        return iter(())

    def __len__(self):
        return 0

    def __bool__(self):
        return True

    def __float__(self):
        return 0.0

    def __int__(self):
        return 0

    __index__ = __int__

    def __hash__(self):
        return 0

    def __repr__(self):
        return "<recorded answer>"


def _wildcard_method(result):
    return lambda self, *args: result(self)


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor", "lshift",
              "rshift"):
    for _prefix in ("", "r"):
        setattr(Wildcard, f"__{_prefix}{_name}__", _wildcard_method(lambda self: self))
for _name in ("neg", "pos", "abs", "invert", "round", "trunc", "floor", "ceil"):
    setattr(Wildcard, f"__{_name}__", _wildcard_method(lambda self: self))
for _name in ("eq", "ne", "lt", "le", "gt", "ge", "contains"):
    setattr(Wildcard, f"__{_name}__", _wildcard_method(lambda self: True))


class Recorder:
    """Stands in for the candidate while the check is recorded: keeps each call's encoded line."""

    def __init__(self):
        self.calls: list[bytes] = []

    def __call__(self, *args, **kwargs):
        try:
            self.calls.append(_call_line(args, kwargs))
        except Unencodable:  # an argument made from an earlier answer: the replay will not find this call
            pass
        return Wildcard()


class Replay:
    """Stands in for the candidate while the check is replayed: the answer recorded for each call."""

    def __init__(self, calls: list[bytes], replies: list[bytes]):
        self.answers: dict[bytes, list[bytes | None]] = {}
        for index, call in enumerate(calls):
            self.answers.setdefault(call, []).append(replies[index] if index < len(replies) else None)

    def __call__(self, *args, **kwargs):
        answers = self.answers.get(_call_line(args, kwargs))
        if not answers:
            raise NotRecorded()
        reply = answers.pop(0) if len(answers) > 1 else answers[0]  # the same call again: the last answer again
        if reply is None:
            raise CandidateGone()
        return _result(load_record(reply))


def _call_line(args: tuple, kwargs: dict) -> bytes:
    return dump_record(kind="call", args=encode_value(args), kwargs=encode_value(kwargs))


def _result(reply: dict):
    if reply["kind"] == "returned":
        return decode_value(reply.get("value"))
    if reply["kind"] == "raised":
        raise _rebuilt(str(reply.get("error_type")), str(reply.get("message")))
    if reply["kind"] == "unencodable":
        raise CandidateRaised("UnsupportedReturnValue", f"the candidate returned {reply.get('message')}")
    raise ProtocolError(f"unexpected reply {reply['kind'][:40]!r}")


def _rebuilt(error_type: str, message: str) -> BaseException:
    """The candidate's exception as one that `check` can catch: a builtin exception of the same
    name where one exists (e.g. ValueError), carrying the candidate's type name either way."""
    builtin = getattr(builtins, error_type, None)
    if isinstance(builtin, type) and issubclass(builtin, Exception):
        try:
            return type(error_type, (CandidateRaised, builtin), {})(error_type, message)
        except TypeError:  # a base with its own memory layout, e.g. OSError
            pass
    return CandidateRaised(error_type, message)


class _HarmlessAsserts(ast.NodeTransformer):
    """`assert test, message` becomes `try: test / except Exception: pass`: the calls in `test` are
    made, and neither a failed comparison nor a Wildcard that a helper rejects ends the check."""

    def visit_Assert(self, node: ast.Assert) -> ast.Try:
        handler = ast.ExceptHandler(type=ast.Name("Exception", ast.Load()), name=None, body=[ast.Pass()])
        return ast.copy_location(ast.Try(body=[ast.Expr(node.test)], handlers=[handler], orelse=[], finalbody=[]),
                                 node)


def defined_check(check_source: str, harmless_asserts: bool) -> dict:
    """The check's module namespace (its imports run here, while still privileged)."""
    tree = ast.parse(check_source, CHECK_FILENAME)
    if harmless_asserts:
        tree = ast.fix_missing_locations(_HarmlessAsserts().visit(tree))
    namespace = {"__name__": "__check__"}
    exec(compile(tree, CHECK_FILENAME, "exec"), namespace)
    return namespace


def recorded_calls(namespace: dict, entry_point: str) -> list[bytes]:
    """The calls `check` makes when every answer is a Wildcard (and no assert fails)."""
    recorder = Recorder()
    namespace[entry_point] = recorder
    random.seed(CHECK_SEED)
    try:
        namespace["check"](recorder)
    except Exception:  # the recording ends here; a later call is then not recorded (see NotRecorded)
        pass
    return recorder.calls


def exchange(calls: list[bytes], call_fd: int, reply_fd: int) -> list[bytes]:
    """Send every call, close the pipe, then collect the candidate's replies (one line each) until it
    stops. Nothing is decoded here: nothing the candidate sends changes what the checker does."""
    try:
        for line in calls:
            while line:
                line = line[os.write(call_fd, line):]
    except BrokenPipeError:  # the candidate ended without reading them all
        pass
    os.close(call_fd)
    replies = []
    with os.fdopen(reply_fd, "rb") as reply_stream:
        while len(replies) < len(calls):
            reply = reply_stream.readline(RECORD_LIMIT + 1)
            if not reply.endswith(b"\n"):
                break
            replies.append(reply)
    return replies


def replayed_verdict(check_source: str, namespace: dict, entry_point: str, candidate: Replay) -> dict:
    namespace[entry_point] = candidate
    random.seed(CHECK_SEED)
    try:
        namespace["check"](candidate)
    except CandidateGone:
        return {"kind": "candidate_gone"}
    except NotRecorded:
        return {"kind": "checker_error", "message": "the check made a call that it did not make while recorded "
                                                    "(its calls depend on earlier answers), so it cannot be judged"}
    except CandidateRaised as error:
        return {"kind": "failed", "error_type": error.error_type[:100], "message": error.message[:1000]}
    except ProtocolError as error:
        return {"kind": "failed", "error_type": "ProtocolError", "message": f"the candidate's reply: {error}"}
    except Exception as error:  # the check failed: AssertionError and the like
        return failure_record(error, check_source, CHECK_FILENAME)
    return {"kind": "passed"}


def drop_privileges(request: dict) -> None:
    """Answers are hostile data (e.g. a set whose items all collide in the hash table): decode and
    compare them unprivileged and within limits."""
    cpu_seconds, memory_bytes = request["cpu_seconds"], request["memory_bytes"]
    linux.set_limits([(resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 1), (resource.RLIMIT_AS, memory_bytes, memory_bytes),
                      (resource.RLIMIT_CORE, 0, 0)])
    if os.geteuid() == 0:
        uid, gid = _nobody()
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        linux.prctl(linux.PR_SET_DUMPABLE, 0)  # setresuid resets it


def _nobody() -> tuple[int, int]:
    try:
        account = pwd.getpwnam("nobody")
        return account.pw_uid, account.pw_gid
    except KeyError:
        return 65534, 65534


def judge(request: dict) -> dict:
    entry_point, check_source = request["entry_point"], request["check"]
    recording = defined_check(check_source, harmless_asserts=True)
    replaying = defined_check(check_source, harmless_asserts=False)
    calls = recorded_calls(recording, entry_point)
    drop_privileges(request)
    replies = exchange(calls, request["call_fd"], request["reply_fd"])
    sys.stdin.buffer.read()  # the harness closes stdin once every process of the candidate has ended
    return replayed_verdict(check_source, replaying, entry_point, Replay(calls, replies))


def main() -> None:
    linux.prctl(linux.PR_SET_DUMPABLE, 0)  # a same-uid program cannot open /proc/PID/mem of this one
    request = json.loads(sys.stdin.buffer.readline())
    verdicts = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # what the check prints cannot mix with the verdict
    try:
        record = judge(request)
    except BaseException as error:  # the check itself is broken: not the candidate's failure
        record = {"kind": "checker_error", "message": f"{type(error).__name__}: {error}"[:1000]}
    verdicts.write(dump_record(**record))
    verdicts.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
