"""Where the engine's time goes on a GPU (a diagnostic, not a benchmark): kernel table of an MMLU
slice and of GSM8K decode steps, 7.7B random weights.

    python -m bench.profile_engine --data-dir DIR --vocab qwen.tiktoken
"""
import argparse
import dataclasses
import time
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from bench.bench_speed import build_model, timed
from eval.backends import NativeBackend
from eval.data import DataSource
from eval.tasks import gsm8k, mmlu
from model import QwenTokenizer


def table(prof, n=18):
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=n, max_name_column_width=60))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", required=True)
    p.add_argument("--vocab", required=True)
    args = p.parse_args()
    model, tok, data = build_model(), QwenTokenizer(args.vocab), DataSource(Path(args.data_dir))
    native = NativeBackend(model, tok, progress=False)
    subjects = mmlu.TASK.subjects[:12]
    reqs = [r for d in mmlu.TASK.load(data, "fewshot", subjects) for r in mmlu.TASK.requests(d, tok, "fewshot", {})]
    native.choice(reqs[:300])  # compile and warm up
    seconds, _ = timed(lambda: native.choice(reqs))
    stats = dict(native.engine.stats)
    print(f"MMLU {len(reqs)} q: {seconds:.2f}s, {stats}")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        native.choice(reqs[:600])
    table(prof)
    greqs = [dataclasses.replace(r, stop=(), stop_ids=(), max_new_tokens=64)
             for d in gsm8k.TASK.load(data, "fewshot")[:150] for r in gsm8k.TASK.requests(d, tok, "fewshot", {})]
    for graphs in (True, False):
        native.engine.cuda_graphs = graphs
        native.engine.stats.clear()
        native.generate(greqs[:20])
        native.engine.stats.clear()
        seconds, _ = timed(lambda: native.generate(greqs))
        steps = native.engine.stats["decode_steps"]
        print(f"GSM8K decode 150 x 64, graphs={graphs}: {seconds:.2f}s, {steps} steps, "
              f"{1000 * seconds / max(1, steps):.1f} ms/step (incl. prefill)", dict(native.engine.stats))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        native.generate(greqs)
    table(prof)
    start = time.time()
    print(f"done in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
