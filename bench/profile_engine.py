"""Where the engine's time goes on a GPU (a diagnostic, not a benchmark): kernel tables of an MMLU slice,
of GSM8K decode steps and of batch-1 decode steps, 7.7B random weights.

    python -m bench.profile_engine --data-dir DIR --vocab qwen.tiktoken [--parts decode1,mmlu1,engine]

decode1 runs first (the invariant op set pins cuBLAS for the whole process, so its fast rows run pinned
products too): per op set, a 512-token batch-1 generation's wall time per step, the kernels launched per
step and the device time they add up to, then the kernel table. mmlu1 serves `--task mmlu --limit 1`'s 57
requests (one per subject, each behind its own 5-shot prefix) in a fresh engine, then again: the first time
holds every first-use cost; the host-side table of a third pass shows where a warm pass waits.
"""
import argparse
import dataclasses
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from bench.bench_speed import build_model, timed
from eval.backends import NativeBackend
from eval.data import DataSource
from eval.tasks import gsm8k, mmlu
from model import QwenTokenizer, ops
from model.engine import Engine


def table(prof, n=18):
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=n, max_name_column_width=60))


def decode1(model, steps: int = 512) -> None:
    for kernels in ("invariant", "fast"):
        model.ops = ops.select(kernels, "cuda")
        engine = Engine(model, progress=False)
        engine.generate([[1]], [steps], [()])  # graphs captured for every read length, kernels compiled
        seconds, _ = timed(lambda: engine.generate([[1]], [steps], [()]))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.generate([[1]], [steps], [()])
        events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        launched = sum(e.count for e in events)
        device_ms = sum(e.self_device_time_total for e in events) / 1000
        print(f"decode1 {kernels}: {1000 * seconds / steps:.2f} ms/step wall ({steps / seconds:.1f} tok/s), "
              f"{launched / steps:.0f} kernels/step, {device_ms / steps:.2f} ms/step of kernel time")
        table(prof, 30)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", required=True)
    p.add_argument("--vocab", required=True)
    p.add_argument("--parts", default="decode1,mmlu1,engine")
    args = p.parse_args()
    parts = args.parts.split(",")
    model, tok, data = build_model(), QwenTokenizer(args.vocab), DataSource(Path(args.data_dir))
    if "decode1" in parts:
        decode1(model)
    if "mmlu1" in parts:
        mmlu_first_docs(model, tok, data)
    if "engine" in parts:
        engine_tables(model, tok, data)


def mmlu_first_docs(model, tok, data) -> None:
    model.ops = ops.select("invariant", "cuda")
    native = NativeBackend(model, tok, progress=False)
    reqs = [mmlu.TASK.requests(docs[0], tok, "fewshot", {})[0] for subject in mmlu.TASK.subjects
            for docs in [mmlu.TASK.load(data, "fewshot", [subject])]]
    first, _ = timed(lambda: native.choice(reqs))
    again, _ = timed(lambda: native.choice(reqs))
    print(f"mmlu1 ({len(reqs)} requests): first serve {first:.2f} s, again {again:.2f} s, {dict(native.engine.stats)}")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        native.choice(reqs)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))


def engine_tables(model, tok, data):
    """An MMLU slice and GSM8K decode steps through the native backend."""
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


if __name__ == "__main__":
    main()
