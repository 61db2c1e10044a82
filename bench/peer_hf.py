"""The peer users would otherwise run: batched `transformers` (the hf backend, batched as
lm-evaluation-harness's HF backend batches) on a subset of MMLU and GSM8K, timed and extrapolated.

    python -m bench.peer_hf --model CKPT --data-dir DATA --ignore-stops

MMLU: 5-shot choice scoring (one forward per question, last-position logits) of --mmlu questions spread
evenly over the test set, so their prompt lengths follow the whole set's; extrapolated to 14,042 questions.
GSM8K: 8-shot greedy generation of --gsm8k problems spread the same way with max_new_tokens fixed at
--new-tokens; --ignore-stops drops the stop strings and end-of-text, so every problem generates exactly that
many tokens (random weights never stop); extrapolated to 1,319 problems. Each part first serves a few
requests untimed (CUDA start-up, kernel selection). Loading is timed apart and not extrapolated.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time
from pathlib import Path

import torch

from bench.common import default_out, print_table, write_json
from eval.backends import HFBackend
from eval.data import DataSource
from eval.registry import get_task
from model import load_model, load_tokenizer

FULL = {"mmlu": 14042, "gsm8k": 1319}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.peer_hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--data-dir", required=True, help="root of the original benchmark files")
    p.add_argument("--out", default=default_out("peer_hf.json"), help="JSON file for the numbers")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--batch-size", type=int, help="rows per batch (default: sized from free memory, at most 64)")
    p.add_argument("--mmlu", type=int, default=1404, help="MMLU questions to time (0: skip)")
    p.add_argument("--gsm8k", type=int, default=256, help="GSM8K problems to time (0: skip)")
    p.add_argument("--new-tokens", type=int, default=256, help="max_new_tokens of every GSM8K problem")
    p.add_argument("--ignore-stops", action="store_true",
                   help="no stop strings or end-of-text: every problem generates --new-tokens tokens")
    return p.parse_args(argv)


def spread(docs: list, n: int) -> list:
    """n documents evenly spaced over the list (all of them when n >= len)."""
    step = max(len(docs) / n, 1.0)
    return [docs[int(k * step)] for k in range(min(n, len(docs)))]


def subset(name: str, data, tok, n: int, adjust=lambda r: r) -> tuple[int, list]:
    task = get_task(name)
    docs = spread(task.load(data, "fewshot"), n)
    return len(docs), [adjust(r) for doc in docs for r in task.requests(doc, tok, "fewshot", {})]


def timed(fn, cuda: bool):
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def serve(kind: str, backend: HFBackend, requests: list, cuda: bool) -> dict:
    """Warm up on a few requests, then time the whole list; batch sizes as the backend chose them."""
    method = getattr(backend, kind)
    warm = requests[:4] if kind == "choice" else [dataclasses.replace(r, max_new_tokens=8) for r in requests[:4]]
    method(warm)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    batches: list[int] = []
    seconds, out = timed(lambda: method(requests, on_done=lambda done: batches.append(len(done))), cuda)
    new_tokens = sum(len(g.tokens) for g in out) if kind == "generate" else 0
    return {"seconds": round(seconds, 2), "prompt_tokens": sum(len(r.tokens) for r in requests),
            "new_tokens": new_tokens, "batches": len(batches), "largest_batch": max(batches),
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None}


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = args.device.startswith("cuda")
    torch.set_grad_enabled(False)
    tok = load_tokenizer(args.model)
    load_s, model = timed(lambda: load_model(args.model, dtype=args.dtype, device=args.device,
                                             dynamic_ntk=False, logn=False), cuda)  # transformers' Qwen2 has neither
    backend = HFBackend.from_native(model, tok, batch_size=args.batch_size, progress=False)
    data = DataSource(Path(args.data_dir))
    parts = []
    if args.mmlu:
        parts.append(("mmlu", "questions", "choice", *subset("mmlu", data, tok, args.mmlu)))
    if args.gsm8k:
        stops = {"stop": (), "stop_ids": ()} if args.ignore_stops else {}
        parts.append(("gsm8k", "problems", "generate", *subset(
            "gsm8k", data, tok, args.gsm8k, lambda r: dataclasses.replace(r, max_new_tokens=args.new_tokens, **stops))))
    rows = []
    print(f"hf backend, {args.dtype}, batch {args.batch_size or 'auto'}; load {load_s:.1f} s", flush=True)
    for task, unit, kind, n, requests in parts:
        row = {"task": task, "items": n, "full_items": FULL[task], **serve(kind, backend, requests, cuda)}
        row["extrapolated_s"] = round(row["seconds"] * FULL[task] / n, 1)
        rows.append(row)
        print(f"{task:6s} {n:>5d}/{FULL[task]} {unit:9s} {row['seconds']:8.1f} s   full (extrapolated) "
              f"{row['extrapolated_s']:8.1f} s   {row['batches']} batches, largest {row['largest_batch']}", flush=True)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    import transformers

    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": device,
              "torch": torch.__version__, "transformers": transformers.__version__, "model": args.model,
              "dtype": args.dtype, "batch_size": args.batch_size or "auto", "new_tokens": args.new_tokens,
              "ignore_stops": args.ignore_stops, "load_s": round(load_s, 1), "rows": rows}
    write_json(args.out, report)
    columns = ("task", "items", "full_items", "seconds", "extrapolated_s")
    print_table(columns, [[row[c] for c in columns] for row in rows])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
