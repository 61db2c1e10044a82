"""The trusted side of a judged run: `python -m eval.sandbox.checker` runs the dataset's check.

The harness sends {"check": source, "entry_point": name, "call_fd": n, "reply_fd": n} through
stdin. The check source (e.g. HumanEval's prompt + test) is executed here, outside the sandbox
that runs the candidate, with `entry_point` bound to a proxy: each call sends its arguments to the
candidate process and gets back plain data (wire.py). One verdict record goes to stdout. The
candidate cannot reach this process (another PID namespace or uid; not dumpable), so nothing
it does in its own address space can make `check` pass.
"""
from __future__ import annotations

import builtins
import json
import os
import sys

from . import linux
from .wire import RECORD_LIMIT, ProtocolError, decode_value, dump_record, encode_value, failure_record, load_record

CHECK_FILENAME = "<check>"


class CandidateGone(BaseException):
    """The candidate process ended (or closed its pipes) before answering. Not an Exception, so
    a check's `except Exception` cannot swallow it."""


class CandidateRaised(Exception):
    """Raised inside the check where the candidate raised; carries the candidate's type name."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type, self.message = error_type, message


class Candidate:
    """Stands in for the candidate function inside `check`."""

    def __init__(self, call_fd: int, reply_fd: int):
        self.calls, self.replies = call_fd, os.fdopen(reply_fd, "rb")

    def __call__(self, *args, **kwargs):
        line = dump_record(kind="call", args=encode_value(args), kwargs=encode_value(kwargs))
        try:
            while line:
                line = line[os.write(self.calls, line):]
        except BrokenPipeError:
            raise CandidateGone() from None
        reply = self.replies.readline(RECORD_LIMIT + 1)
        if not reply.endswith(b"\n"):
            raise CandidateGone()
        return self._result(load_record(reply))

    @staticmethod
    def _result(reply: dict):
        if reply["kind"] == "returned":
            return decode_value(reply.get("value"))
        if reply["kind"] == "raised":
            error_type, message = str(reply.get("error_type")), str(reply.get("message"))
            raise _rebuilt(error_type, message)
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


def verdict(check_source: str, entry_point: str, candidate: Candidate) -> dict:
    namespace = {"__name__": "__check__"}
    exec(compile(check_source, CHECK_FILENAME, "exec"), namespace)
    namespace[entry_point] = candidate
    check = namespace["check"]
    try:
        check(candidate)
    except CandidateGone:
        return {"kind": "candidate_gone"}
    except CandidateRaised as error:
        return {"kind": "failed", "error_type": error.error_type[:100], "message": error.message[:1000]}
    except ProtocolError as error:
        return {"kind": "failed", "error_type": "ProtocolError", "message": f"the candidate's reply: {error}"}
    except Exception as error:  # the check failed: AssertionError and the like
        return failure_record(error, check_source, CHECK_FILENAME)
    return {"kind": "passed"}


def main() -> None:
    linux.prctl(linux.PR_SET_DUMPABLE, 0)  # a same-uid program cannot open /proc/PID/mem of this one
    request = json.loads(sys.stdin.buffer.read())
    verdicts = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # what the check prints cannot mix with the verdict
    try:
        record = verdict(request["check"], request["entry_point"], Candidate(request["call_fd"], request["reply_fd"]))
    except BaseException as error:  # the check itself is broken: not the candidate's failure
        record = {"kind": "checker_error", "message": f"{type(error).__name__}: {error}"[:1000]}
    verdicts.write(dump_record(**record))
    verdicts.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
