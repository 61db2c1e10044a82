"""torchrun data parallel on CPU (gloo): same files as one process, resume across world sizes, a killed rank."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eval.distributed import TIMEOUT_ENV, assign, doc_cost
from eval.api import ChoiceRequest, GenerateRequest
from eval.runner import main
from eval.run_layout import model_folder
from fixtures import find_run, wait_for_lines, write_mmlu

REPO = Path(__file__).resolve().parents[1]
FILES = ("samples.jsonl", "table.md", "table.csv")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int, args: list, **env) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(REPO / "eval" / "runner.py"), *map(str, args)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **env})


def finished(proc: subprocess.Popen, timeout=120) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def files(run_dir: Path) -> dict:
    return {name: (run_dir / name).read_text() for name in FILES}


def worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The torchrun child process running `rank` (workers are the launcher's children; RANK is in their environment)."""
    threads = Path(f"/proc/{launcher.pid}/task").iterdir()
    children = [pid for thread in threads for pid in (thread / "children").read_text().split()]
    for pid in children:
        if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank} among {children}")


# ---- sharding -------------------------------------------------------------------------------------------
def test_assign_is_greedy_longest_first_and_deterministic():
    costs = [5, 9, 1, 9, 3, 7, 2]
    shards = assign(costs, 3)
    # costliest first: #1 (9) -> r0, #3 (9) -> r1, #5 (7) -> r2, #0 (5) -> r2, #4 (3) -> r0, #6 (2) -> r1, #2 (1) -> r1
    assert shards == [[1, 4], [2, 3, 6], [0, 5]]
    assert sorted(i for s in shards for i in s) == list(range(len(costs)))
    assert assign(costs, 3) == shards and assign(costs, 1) == [list(range(7))]
    assert assign([1, 1], 3) == [[0], [1], []]  # more ranks than documents: some serve nothing
    skewed = [100] + [1] * 50
    assert [sum(skewed[i] for i in s) for s in assign(skewed, 2)] == [100, 50]


def test_doc_cost_counts_tokens_past_the_shared_prefix_and_the_generation_budget():
    choice = ChoiceRequest("p", tuple(range(120)), (1, 2), shared_prefix=100)
    gen = GenerateRequest("p", tuple(range(30)), max_new_tokens=64, shared_prefix=10)
    assert doc_cost([choice]) == 20 and doc_cost([gen]) == 84 and doc_cost([choice, gen]) == 104


# ---- same files as one process ----------------------------------------------------------------------------
CASES = {2: ["--task", "mmlu", "--subjects", "anatomy,astronomy"],  # choice scoring, shared few-shot prefixes
         3: ["--task", "gsm8k"]}  # greedy generation, one document per rank


@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_write_the_files_of_one_process(ranks, tiny_checkpoint, data_root, tmp_path):
    common = [*CASES[ranks], "--model", tiny_checkpoint, "--data-dir", data_root, "--no-progress"]
    assert main([str(a) for a in common + ["--output-dir", tmp_path / "one"]]) == 0
    code, out = finished(torchrun(ranks, common + ["--output-dir", tmp_path / "many"]))
    assert code == 0, out
    task = CASES[ranks][1]
    one, many = (find_run(tmp_path / d, f"{task}-fewshot-fp32") for d in ("one", "many"))
    assert files(many) == files(one)
    results = json.loads((many / "results.json").read_text())
    assert not results["partial"] and results["n_done"] == results["n_docs"]
    assert results["config"]["world_size"] == ranks
    assert sorted(p.name for p in many.glob("rank*.log")) == [f"rank{k}.log" for k in range(1, ranks)]
    assert not list(many.glob("samples.rank*.jsonl"))  # merged into samples.jsonl, then removed
    assert out.count(f"### {task} (fewshot)") == 1  # only rank 0 prints the table


# ---- a killed rank, then resume with another number of ranks -----------------------------------------------
N_BIG = 200  # documents: two MMLU subjects, long enough to be killed half way


@pytest.fixture(scope="module")
def big_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmlu150")
    write_mmlu(root, rows_per_subject=N_BIG // 2)
    return root


def big_args(checkpoint, data, out):
    return ["--task", "mmlu", "--model", checkpoint, "--data-dir", data, "--subjects", "anatomy,astronomy",
            "--output-dir", out, "--no-progress", "--batch-size", "1"]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, big_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    assert main([str(a) for a in big_args(tiny_checkpoint, big_data, out)]) == 0
    return files(find_run(out, "mmlu-fewshot-fp32"))


def saved_doc_ids(run_dir: Path) -> set:
    return {json.loads(line)["doc_id"] for path in run_dir.glob("samples*.jsonl")
            for line in path.read_text().splitlines() if line.endswith("}")}


@pytest.mark.parametrize("resume_ranks", [3, 1])
def test_killed_rank_fails_the_job_and_another_world_size_resumes(resume_ranks, tiny_checkpoint, big_data, reference,
                                                                  tmp_path, capsys):
    args = big_args(tiny_checkpoint, big_data, tmp_path)
    run_dir = tmp_path / model_folder(str(tiny_checkpoint)) / "mmlu-fewshot-fp32"
    proc = torchrun(2, args)
    wait_for_lines(run_dir / "samples.rank1.jsonl", 3, proc)
    os.kill(worker_pid(proc, 1), signal.SIGKILL)
    code, out = finished(proc)
    assert code != 0
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9", out), out  # torchrun's root cause
    assert not (run_dir / "results.json").exists()  # nothing partial reported as complete
    done = saved_doc_ids(run_dir)
    assert 3 <= len(done) < N_BIG

    if resume_ranks == 1:
        assert main([str(a) for a in args]) == 0
        code, out = 0, capsys.readouterr().out
    else:
        code, out = finished(torchrun(resume_ranks, args))
    assert code == 0, out
    assert f"mmlu: resuming, {len(done)} of {N_BIG} documents already done" in out
    assert files(run_dir) == reference
    assert not list(run_dir.glob("samples.rank*.jsonl"))


def test_rank_that_never_arrives_is_named_by_rank_0(tiny_checkpoint, big_data, tmp_path):
    """A hung rank (here: stopped) is caught by the monitored barrier's timeout, not waited for forever."""
    args = big_args(tiny_checkpoint, big_data, tmp_path)
    run_dir = tmp_path / model_folder(str(tiny_checkpoint)) / "mmlu-fewshot-fp32"
    proc = torchrun(2, args, **{TIMEOUT_ENV: "0.2"})  # minutes: 12 s
    wait_for_lines(run_dir / "samples.rank1.jsonl", 3, proc)
    rank0, rank1 = worker_pid(proc, 0), worker_pid(proc, 1)
    os.kill(rank1, signal.SIGSTOP)
    deadline = time.time() + 90
    while alive(rank0) and time.time() < deadline:  # rank 0 serves its share, then waits 12 s for rank 1
        time.sleep(0.1)
    os.kill(rank1, signal.SIGCONT)  # let torchrun's SIGTERM reach it now, not after its 30 s grace
    code, out = finished(proc)
    assert code != 0
    assert "error: rank 0 of 2: mmlu: waiting for the other ranks failed: [Rank 0]: Ranks 1 failed to pass " \
           "monitoredBarrier" in out, out
    assert not (run_dir / "results.json").exists()


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
