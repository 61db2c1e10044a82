"""Data-parallel evaluation under torchrun: one model per process, documents sharded across ranks.

    torchrun --nproc-per-node 8 eval/runner.py --task mmlu ...            (one node)
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 eval/runner.py ...

Every rank plans the whole task (the plans must agree: checked by hash), takes its share of the documents
not saved yet (greedy longest-first by tokens, the same on every rank), and serves it like a single
process. Records are keyed by document, never by rank:
    rank 0   appends its records to samples.jsonl (it owns the run directory),
    rank k   appends its records to samples.rank<k>.jsonl and logs to rank<k>.log,
each append fsynced, so a killed job loses at most the batches in flight. At the end every rank passes a
monitored barrier (a rank that never arrives is named), rank 0 gathers all records, writes samples.jsonl
in document order and the tables exactly as one process would, and the shards are deleted. Opening a
run (here or in a single process) reads the shards of an earlier job too, whatever its number of ranks.

Only Python objects cross process boundaries, so the process group is gloo on CPUs and GPUs alike
(monitored_barrier, which names missing ranks, exists only for gloo).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

from .api import UserError

TIMEOUT_ENV = "QWEN_EVAL_DIST_TIMEOUT"  # minutes a rank waits for the others at a collective (default 60)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job, and the collectives the pipeline uses; each is trivial for one process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = ""
    timeout: timedelta = timedelta(0)
    terminal: int = 2  # a duplicate of the launching terminal's stderr: rank k's own stderr goes to its log
    group: object = None  # the process group of these ranks (None: the whole world); see tensor parallel
    tp: object = None  # with --tensor-parallel N: this process's model.tensor_parallel.Group
    global_rank: int = 0  # names the log file

    def same_everywhere(self, task: str, digest: str) -> None:
        """Every rank planned the same documents, prompts and model (compared by digest), or the job stops."""
        if self.world == 1:
            return
        import torch.distributed as dist

        digests = [None] * self.world
        dist.all_gather_object(digests, digest, group=self.group)
        odd = [r for r, d in enumerate(digests) if d != digests[0]]
        if odd:
            self.fail(f"{task}: rank(s) {', '.join(map(str, odd))} planned other documents, prompts or model than "
                      f"rank 0 (different data, checkpoint, tokenizer or code on that node?)")

    def share(self, obj):
        """Rank 0's `obj`, on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, group=self.group, group_src=0)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        parts = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, parts, group=self.group, group_dst=0)
        return parts

    def wait_for_all(self, task: str) -> None:
        """All ranks meet here once their share is served; rank 0 names the ranks that do not arrive in time."""
        if self.world == 1:
            return
        import torch.distributed as dist

        try:
            dist.monitored_barrier(group=self.group, timeout=self.timeout, wait_all_ranks=True)
        except RuntimeError as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[-1]
            who = "waiting for the other ranks" if self.rank == 0 else "waiting for rank 0"
            self.fail(f"{task}: {who} failed: {reason}. Nothing was reported as complete; finished records are "
                      f"saved: re-run the same command (any number of ranks) to resume. Raise {TIMEOUT_ENV} "
                      f"(minutes, now {self.timeout.total_seconds() / 60:g}) if ranks only finish far apart.")

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def say(self, message: str) -> None:
        """A line on this rank's stderr and, for rank k whose stderr is its log, on the launching terminal too."""
        print(message, file=sys.stderr, flush=True)
        if self.global_rank:
            os.write(self.terminal, (message + "\n").encode())

    def fail(self, message: str):
        self.say(f"error: rank {self.rank} of {self.world}: {message}")
        raise SystemExit(1)


SINGLE = Ranks()  # one process: every collective is trivial


# ---- sharding -------------------------------------------------------------------------------------------
def doc_cost(requests: list) -> int:
    """Tokens a document puts through the model: prompts past the shared few-shot prefix (computed once per
    rank and group), plus the generation budget (what decoding costs is unknown before it runs)."""
    return sum(max(1, len(r.tokens) - getattr(r, "shared_prefix", 0)) + getattr(r, "max_new_tokens", 0)
               for r in requests)


def assign(costs: list[int], world: int) -> list[list[int]]:
    """Greedy longest-first: each item, costliest first (ties: lower index), goes to the least-loaded rank
    (ties: lower rank). Deterministic, so every rank computes the same split without talking."""
    loads, shards = [0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        shards[r].append(i)
        loads[r] += costs[i]
    return [sorted(s) for s in shards]


# ---- launch ---------------------------------------------------------------------------------------------
def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_launch(config) -> None:
    if world_size() > 1 and (config.dry_run or config.rescore):
        raise UserError("--dry-run and --rescore run in one process: start them with python, not torchrun")
    tp = config.backend_options.get("tensor_parallel", 1)  # at least 1: checked as read
    if world_size() % tp:
        raise UserError(f"--tensor-parallel {tp} needs a multiple of {tp} processes: torchrun --nproc-per-node "
                        f"{tp} eval/runner.py ... (found {world_size()})")
    if tp > 1 and config.backend != "native":
        raise UserError(f"--tensor-parallel {tp} splits the native model: use --backend native")


def setup(config, plans) -> Ranks:
    """Join torchrun's process group; SINGLE in a single process (WORLD_SIZE unset or 1). With
    --tensor-parallel N, the ranks returned are the data-parallel ones (world / N model copies)."""
    tp = config.backend_options.get("tensor_parallel", 1)
    if world_size() <= 1:
        return SINGLE
    timed = [p.task.name for p in plans if p.task.timed]
    if timed:
        raise UserError(f"task {timed[0]} times requests one at a time: run it in one process, not under torchrun")
    import torch
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = config.device
    if device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    elif device == "auto":
        device = "cpu"
    try:
        timeout = timedelta(minutes=float(os.environ.get(TIMEOUT_ENV, "60")))
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r}: expected minutes, e.g. 90") from None
    dist.init_process_group("gloo", timeout=timeout)
    ranks = Ranks(rank, dist.get_world_size(), local, device, timeout, os.dup(2), global_rank=rank)
    if tp > 1:
        from model.tensor_parallel import init_groups

        layout = init_groups(tp, device.startswith("cuda"))
        ranks = replace(ranks, rank=layout.dp_rank, world=layout.dp_size, group=layout.dp_group, tp=layout.tp)
    if rank:
        log_to(plans[0].run_dir, ranks)
    return ranks


def backend_config(config, ranks: Ranks):
    """The run configuration this rank loads the model with: its own device, a progress bar on rank 0 only."""
    if ranks.world == 1:
        return config
    return replace(config, device=ranks.device, no_progress=config.no_progress or ranks.global_rank > 0)


def close(ranks: Ranks) -> None:
    if ranks.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def log_to(run_dir: Path, ranks: Ranks) -> None:
    """Point this process's stdout and stderr (file descriptors, so C++ warnings too) at <run_dir>/rank<k>.log."""
    path = run_dir / f"rank{ranks.global_rank}.log"
    if path.exists() and os.path.samestat(os.fstat(1), path.stat()):
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as err:
        raise UserError(f"rank {ranks.rank}: cannot write {path} ({err.strerror})") from None
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    print(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} rank {ranks.rank} of {ranks.world}, pid {os.getpid()}, "
          f"device {ranks.device}", flush=True)
