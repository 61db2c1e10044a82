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

import argparse
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from . import pipeline
from .api import UserError, stable_hash
from .results import RunStore

TIMEOUT_ENV = "QWEN_EVAL_DIST_TIMEOUT"  # minutes a rank waits for the others at a collective (default 60)
SHARD_GLOB = "samples.rank*.jsonl"


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int
    device: str
    timeout: timedelta
    terminal: int  # a duplicate of the launching terminal's stderr: rank k's own stderr goes to its log


# ---- run directory: rank shards (used by the single-process path too) --------------------------------
def shard_path(run_dir: Path, rank: int) -> Path:
    return run_dir / f"samples.rank{rank}.jsonl"


def open_store(run_dir: Path, identity: dict, overwrite: bool) -> tuple[RunStore, dict]:
    """Claim the run directory; saved records by doc_id, those an earlier torchrun job left in shards included."""
    fresh = overwrite or not (run_dir / "run.json").exists()  # shards of unknown or discarded runs never count
    store = RunStore(run_dir, identity, overwrite)
    if fresh:
        drop_shards(run_dir)
    saved = store.load()
    for path in sorted(run_dir.glob(SHARD_GLOB)):
        for doc_id, record in RunStore.reader(path).load().items():
            saved.setdefault(doc_id, record)
    return store, saved


def drop_shards(run_dir: Path) -> None:
    for path in run_dir.glob(SHARD_GLOB):
        path.unlink(missing_ok=True)


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


def check_launch(args) -> None:
    if world_size() > 1 and (args.dry_run or args.rescore):
        raise UserError("--dry-run and --rescore run in one process: start them with python, not torchrun")


def setup(args, plans) -> Ranks | None:
    """Join torchrun's process group; None in a single process (WORLD_SIZE unset or 1)."""
    if world_size() <= 1:
        return None
    timed = [p.task.name for p in plans if getattr(p.task, "measures", False)]
    if timed:
        raise UserError(f"task {timed[0]} times requests one at a time: run it in one process, not under torchrun")
    import torch
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = args.device
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
    ranks = Ranks(rank, dist.get_world_size(), local, device, timeout, os.dup(2))
    if rank:
        _log_to(plans[0].run_dir, ranks)
    return ranks


def backend_args(args, ranks: Ranks | None):
    """The arguments `_backend` loads the model with: this rank's device, a progress bar on rank 0 only."""
    if ranks is None:
        return args
    quiet = args.no_progress or ranks.rank > 0
    return argparse.Namespace(**{**vars(args), "device": ranks.device, "no_progress": quiet})


def close(ranks: Ranks | None) -> None:
    if ranks is not None:
        import torch.distributed as dist

        dist.destroy_process_group()


def _log_to(run_dir: Path, ranks: Ranks) -> None:
    """Point this process's stdout and stderr (file descriptors, so C++ warnings too) at <run_dir>/rank<k>.log."""
    path = run_dir / f"rank{ranks.rank}.log"
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


def _say(ranks: Ranks, message: str) -> None:
    """A line on this rank's stderr and, for rank k whose stderr is its log, on the launching terminal too."""
    print(message, file=sys.stderr, flush=True)
    if ranks.rank:
        os.write(ranks.terminal, (message + "\n").encode())


def _fail(ranks: Ranks, message: str):
    _say(ranks, f"error: rank {ranks.rank} of {ranks.world}: {message}")
    raise SystemExit(1)


# ---- one task ---------------------------------------------------------------------------------------------
def execute(plan, backend, ranks: Ranks, *, overwrite: bool = False, config: dict | None = None, log=print):
    """pipeline.execute across ranks: each rank serves its share; rank 0 gathers the records and writes the run."""
    if ranks.rank:
        _log_to(plan.run_dir, ranks)
    hashes = {doc.doc_id: pipeline.prompt_hash(reqs) for doc, reqs in zip(plan.docs, plan.requests)}
    _same_plan_everywhere(ranks, plan.task.name, stable_hash([hashes, plan.identity]))
    store = saved = None
    if ranks.rank == 0:
        store, saved = open_store(plan.run_dir, plan.identity, overwrite)
        pipeline._check_saved(saved, hashes, store)
    mine = _share(plan, ranks, set(_broadcast(sorted(saved) if ranks.rank == 0 else None)), log)
    started = time.time()
    records = _serve_share(plan, backend, ranks, mine, hashes, store)
    _wait_for_every_rank(ranks, plan.task.name)
    gathered = _gather(records)
    results = None
    if ranks.rank == 0:
        for part in gathered:
            saved.update((r["doc_id"], r) for r in part)
        config = {**(config or {}), "world_size": ranks.world}
        results = pipeline.finish(plan, store, saved, partial=False, config=config, seconds=time.time() - started)
        drop_shards(plan.run_dir)
    _barrier()  # samples.jsonl is complete: shards on disks rank 0 cannot see may go too
    shard_path(plan.run_dir, ranks.rank).unlink(missing_ok=True)
    return results


def _share(plan, ranks: Ranks, done: set, log) -> list[int]:
    """This rank's documents (indices into plan.docs) among those not saved yet."""
    todo = [k for k, doc in enumerate(plan.docs) if doc.doc_id not in done]
    mine = [todo[i] for i in assign([doc_cost(plan.requests[k]) for k in todo], ranks.world)[ranks.rank]]
    if done and todo and ranks.rank == 0:
        log(f"{plan.task.name}: resuming, {len(plan.docs) - len(todo)} of {len(plan.docs)} documents already done")
    log(f"{plan.task.name}: rank {ranks.rank} of {ranks.world} serves {len(mine)} of {len(todo)} documents "
        f"({sum(doc_cost(plan.requests[k]) for k in mine)} tokens)")
    return mine


def _serve_share(plan, backend, ranks: Ranks, mine: list[int], hashes: dict, store) -> list[dict]:
    """Serve this rank's documents, appending each batch's records (rank 0: samples.jsonl, rank k: its shard)."""
    sink = store if ranks.rank == 0 else RunStore.reader(shard_path(plan.run_dir, ranks.rank))
    if ranks.rank:
        sink.load()  # cut a torn last line an earlier job left, before appending after it
    records: list[dict] = []

    def on_records(batch):
        sink.append(batch)
        records.extend(batch)

    try:
        pipeline.serve_docs(plan, backend, mine, hashes, on_records)
    except KeyboardInterrupt:
        print(f"{plan.task.name}: rank {ranks.rank} interrupted; its finished records are saved (under torchrun no "
              f"partial table is written): re-run the same command to resume", file=sys.stderr)
        raise
    except Exception as err:  # the traceback follows on stderr (rank k: its log)
        where = f" (traceback in {plan.run_dir / f'rank{ranks.rank}.log'})" if ranks.rank else ""
        _say(ranks, f"error: rank {ranks.rank} of {ranks.world} failed serving its share of {plan.task.name}: "
                    f"{type(err).__name__}: {err}{where}")
        raise
    return records


def _same_plan_everywhere(ranks: Ranks, task: str, digest: str) -> None:
    import torch.distributed as dist

    digests = [None] * ranks.world
    dist.all_gather_object(digests, digest)
    odd = [r for r, d in enumerate(digests) if d != digests[0]]
    if odd:
        _fail(ranks, f"{task}: rank(s) {', '.join(map(str, odd))} planned other documents, prompts or model than "
                     f"rank 0 (different data, checkpoint, tokenizer or code on that node?)")


def _broadcast(obj):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _wait_for_every_rank(ranks: Ranks, task: str) -> None:
    """All ranks meet here once their shard is served; rank 0 names the ranks that do not arrive in time."""
    import torch.distributed as dist

    try:
        dist.monitored_barrier(timeout=ranks.timeout, wait_all_ranks=True)
    except RuntimeError as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[-1]
        who = "waiting for the other ranks" if ranks.rank == 0 else "waiting for rank 0"
        _fail(ranks, f"{task}: {who} failed: {reason}. Nothing was reported as complete; finished records are "
                     f"saved: re-run the same command (any number of ranks) to resume. Raise {TIMEOUT_ENV} "
                     f"(minutes, now {ranks.timeout.total_seconds() / 60:g}) if ranks only finish far apart.")


def _gather(records: list[dict]) -> list[list[dict]] | None:
    import torch.distributed as dist

    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(records, parts, dst=0)
    return parts


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()
