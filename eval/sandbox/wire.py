"""What crosses the sandbox boundary, parsed strictly: flat JSON-line records and plain values.

Everything read from a sandboxed process is hostile bytes. A record is one JSON object per line,
at most RECORD_LIMIT bytes, whose values are scalars; a value (a candidate's return value or a
call's arguments) is plain data in a tagged form that keeps its type (tuple vs list, int vs
float vs bool, nan and inf, sets, dicts with any hashable keys) and can carry no behaviour, so
an object with a forged __eq__ cannot cross. Parsing raises ProtocolError and nothing else.
"""
from __future__ import annotations

import dataclasses
import json
import numbers
import os
import re
import traceback
from dataclasses import dataclass

RECORD_LIMIT = 4 * 1024**2   # bytes of one record line (a call's arguments or a return value)
MAX_DEPTH = 100              # nesting of a value
MESSAGE_LIMIT = 1000         # characters of an error message kept
MEMORY_POLL_SECONDS = 0.05   # how often the total memory of a program's processes is measured
REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # the harness's checkout

_INT = re.compile(r"-?0x[0-9a-f]+")
_SEQUENCES = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}


class ProtocolError(ValueError):
    """Bytes that are not a well-formed record or value."""


class Unencodable(TypeError):
    """A value that is not plain data (a generator, a custom object, a cycle)."""


# ---- the launch request ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    """Resource limits of a program (the CPU limit follows from the timeout)."""

    memory_bytes: int = 4 * 1024**3        # RLIMIT_AS of each process
    total_memory_bytes: int = 4 * 1024**3  # resident memory of all the program's processes together
    file_size_bytes: int = 16 * 1024**2    # RLIMIT_FSIZE
    open_files: int = 64                   # RLIMIT_NOFILE
    processes: int = 64                    # RLIMIT_NPROC above what the uid already runs (threads count)
    scratch_bytes: int = 64 * 1024**2      # size of the tmpfs working directory and /dev/shm (namespace mode)
    scratch_inodes: int = 4096             # files and directories in each of them


@dataclass(frozen=True)
class LaunchRequest:
    """Everything the launcher needs; sent through its stdin, never argv or the environment."""

    source: str
    workdir: str
    result_fd: int
    namespaces: bool
    uid: int | None
    limits: Limits
    cpu_seconds: int
    protected_pids: list[int]      # the harness, its process group, the launcher, the checker
    token: str | None = None       # whole-program mode: proof that the program returned
    entry_point: str | None = None  # candidate mode: the function that answers calls
    call_fd: int | None = None
    reply_fd: int | None = None

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    @classmethod
    def from_json(cls, text: bytes) -> LaunchRequest:
        fields = json.loads(text)
        return cls(**{**fields, "limits": Limits(**fields["limits"])})


# ---- records ---------------------------------------------------------------------------------------
def dump_record(**record: object) -> bytes:
    return json.dumps(record, allow_nan=False).encode() + b"\n"


def load_record(line: bytes) -> dict:
    """One record: a JSON object with a string "kind" whose values are JSON scalars or one
    encoded value (under "value", "args" or "kwargs"), checked later by decode_value."""
    if len(line) > RECORD_LIMIT:
        raise ProtocolError(f"record longer than {RECORD_LIMIT} bytes")
    try:
        record = json.loads(line, parse_constant=_reject_constant)
    except (ValueError, RecursionError, MemoryError) as error:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(f"not a JSON record: {type(error).__name__}") from None
    if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
        raise ProtocolError("a record is a JSON object with a string 'kind'")
    for key, value in record.items():
        if key not in ("value", "args", "kwargs") and not isinstance(value, (str, int, float, bool, type(None))):
            raise ProtocolError(f"record field {key!r} is not a scalar")
    return record


def _reject_constant(name: str) -> None:
    raise ProtocolError(f"{name} is not JSON")


class LineBuffer:
    """Splits a byte stream into lines; a line longer than `limit` is dropped whole and counted."""

    def __init__(self, limit: int = RECORD_LIMIT):
        self.limit, self.pending, self.overlong, self.skipping = limit, b"", 0, False

    def feed(self, chunk: bytes) -> list[bytes]:
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        if lines and self.skipping:  # the end of a line that was already too long
            lines, self.skipping = lines[1:], False
        kept = [line for line in lines if len(line) <= self.limit]
        self.overlong += len(lines) - len(kept)
        if len(self.pending) > self.limit:
            self.pending, self.skipping, self.overlong = b"", True, self.overlong + 1
        return kept


# ---- values ----------------------------------------------------------------------------------------
def encode_value(value: object, depth: int = 0) -> object:
    """Plain data to its tagged JSON form. Subclasses cross as their base type, by value (a
    namedtuple as a tuple, a Counter as a dict, numpy numbers as int or float)."""
    if depth > MAX_DEPTH:
        raise Unencodable(f"nested deeper than {MAX_DEPTH} levels (or a cycle)")
    if value is None or type(value) is bool:
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, (int, numbers.Integral)):
        return ["int", hex(int(value))]
    if isinstance(value, (float, numbers.Real)):
        return ["float", float(value).hex()]
    if isinstance(value, bytes):
        return ["bytes", bytes(value).hex()]
    if isinstance(value, dict):
        return ["dict", [[encode_value(k, depth + 1), encode_value(v, depth + 1)] for k, v in value.items()]]
    for name, kind in _SEQUENCES.items():
        if isinstance(value, kind):
            return [name, [encode_value(item, depth + 1) for item in value]]
    raise Unencodable(f"an object of type {type(value).__name__}, which is not plain data")


def decode_value(data: object, depth: int = 0) -> object:
    """The inverse of encode_value, for hostile input: only builtins come out."""
    if depth > MAX_DEPTH:
        raise ProtocolError(f"value nested deeper than {MAX_DEPTH} levels")
    if data is None or isinstance(data, (bool, str)):
        return data
    if not (isinstance(data, list) and len(data) == 2 and isinstance(data[0], str)):
        raise ProtocolError("a value is null, a boolean, a string or a [type, payload] pair")
    kind, payload = data
    try:
        if kind == "int" and isinstance(payload, str) and _INT.fullmatch(payload):
            return int(payload, 16)
        if kind == "float" and isinstance(payload, str):
            return float.fromhex(payload)  # also "nan", "inf", "-inf"
        if kind == "bytes" and isinstance(payload, str):
            return bytes.fromhex(payload)
        if kind == "dict" and isinstance(payload, list):
            return {decode_value(k, depth + 1): decode_value(v, depth + 1) for k, v in map(_pair, payload)}
        if kind in _SEQUENCES and isinstance(payload, list):
            return _SEQUENCES[kind](decode_value(item, depth + 1) for item in payload)
    except (ValueError, TypeError, OverflowError) as error:  # bad hex, unhashable keys, ...
        raise ProtocolError(f"bad {kind} value: {type(error).__name__}") from None
    raise ProtocolError(f"unknown value type {kind[:40]!r} or bad payload")


def safe_text(text: object) -> str:
    """Text that came out of a program, safe to store and hash: a lone surrogate (which UTF-8 cannot
    encode, e.g. in an exception message) becomes its backslash escape."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def _pair(item: object) -> tuple[object, object]:
    if not (isinstance(item, list) and len(item) == 2):
        raise ProtocolError("a dict entry is a [key, value] pair")
    return item[0], item[1]


def failure_record(error: BaseException, source: str, filename: str) -> dict:
    """kind "failed", the exception's type name and text; for a bare `assert`, the failing line."""
    try:
        text = str(error)
    except BaseException:
        text = "<unprintable exception>"
    if not text:
        lines = [line for frame, line in traceback.walk_tb(error.__traceback__)
                 if frame.f_code.co_filename == filename]
        source_lines = source.splitlines()
        if lines and 0 < lines[-1] <= len(source_lines):
            text = source_lines[lines[-1] - 1].strip()
    return {"kind": "failed", "error_type": type(error).__name__[:100], "message": text[:MESSAGE_LIMIT]}
