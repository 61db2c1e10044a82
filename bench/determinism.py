"""Same numbers however the work is batched, and what that costs, through the CLI (a benchmark, not a test).

    python -m bench.determinism --model CKPT --data-dir DATA [--parts mmlu,gsm8k,humaneval,profile]

CKPT is a checkpoint on local disk (random Qwen-7B-shaped bf16 weights: `python -m bench.e2e --data DATA --parts disk`
writes one to scratch/e2e-qwen-7b-random).
For each task, one after the other on the same GPU: the batch-invariant kernels (the default) and the
library kernels (`--kernels fast`) on the whole benchmark at the automatic batch size (their times are the
cost), then the invariant kernels at `--batch-size` 16, 7 and 1 and with `--no-prefix-reuse` on subsets. Every
run's records are compared with the automatic invariant run's, document by document, on the raw model
outputs (choice logits, generated tokens): the goal is 0 differing. Random weights never emit a stop, so
generation tasks run to their token limit. Rows go to bench/results/determinism.json and a table.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

# (name, extra flags, which documents: "all", "subset" or "small")
WAYS = [("invariant, auto batch", [], "all"), ("fast (library kernels), auto batch", ["--kernels", "fast"], "all"),
        ("invariant, batch 16", ["--batch-size", "16"], "subset"), ("invariant, batch 7", ["--batch-size", "7"], "subset"),
        ("invariant, batch 1", ["--batch-size", "1"], "small"),
        ("invariant, prompts whole (no prefix reuse)", ["--no-prefix-reuse"], "subset")]
# --limit per selection (MMLU's is per subject); None = the whole benchmark
# (random weights generate to the token limit: 64 GSM8K problems at batch 7 are ~4,700 decode steps)
LIMITS = {"mmlu": {"all": None, "subset": 20, "small": 2}, "gsm8k": {"all": None, "subset": 64, "small": 8},
          "humaneval": {"all": None, "subset": 24, "small": 4}, "profile": {"all": None}}
TASK_FLAGS = {"humaneval": ["--allow-code-execution"]}


def run_cli(task: str, flags: list[str], limit: int | None, args, out: Path) -> dict:
    command = [sys.executable, "eval/runner.py", "--task", task, "--model", args.model, "--data-dir", args.data_dir,
               "--output-dir", str(out), "--no-progress", *TASK_FLAGS.get(task, []), *flags]
    if limit:
        command += ["--limit", str(limit)]
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, never a resume of an earlier one
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    results = json.loads(next(out.glob(f"*/{task}-*/results.json")).read_text())
    return {"wall_s": round(wall, 1), "timings": results.get("timings", {}), "metrics": results.get("metrics", {}),
            "records": records(next(out.glob(f"*/{task}-*/samples.jsonl")))}


def records(samples: Path) -> dict[str, list]:
    """doc_id -> the raw model outputs of its record."""
    return {r["doc_id"]: r["responses"] for r in map(json.loads, samples.read_text().splitlines())}


def measure(task: str, args, root: Path) -> list[dict]:
    rows, reference = [], None
    for name, flags, selection in WAYS:
        if selection not in LIMITS[task]:
            continue
        limit = args.whole_limit if selection == "all" and args.whole_limit else LIMITS[task][selection]
        run = run_cli(task, flags, limit, args, root / f"{task}-{len(rows)}")
        if reference is None:
            reference = run["records"]
        shared = [d for d in run["records"] if d in reference]
        differ = sum(run["records"][d] != reference[d] for d in shared)
        rows.append({"task": task, "way": name, "documents": len(shared), "differ": differ, "wall_s": run["wall_s"],
                     **{f"{k}_s": round(v, 1) for k, v in run["timings"].items() if isinstance(v, (int, float))},
                     **({"metrics": run["metrics"]} if task == "profile" else {})})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--parts", default="mmlu,gsm8k,humaneval,profile")
    p.add_argument("--whole-limit", type=int, help="--limit for the automatic-batch rows (default: the whole benchmark)")
    p.add_argument("--work-dir", default="scratch/determinism")
    p.add_argument("--out", default="bench/results/determinism.json")
    args = p.parse_args()
    import torch

    rows = [row for task in args.parts.split(",") for row in measure(task, args, Path(args.work_dir))]
    result = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\n{result['device']}, {result['date']}\n")
    print("| task | way | documents | differ from invariant auto | serve s | wall s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['way']} | {r['documents']} | {r['differ']} | {r.get('serve_s', '')} | {r['wall_s']} |")


if __name__ == "__main__":
    main()
