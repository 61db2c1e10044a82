"""The larger family on one GPU: a random Qwen-14B-shaped BF16 checkpoint and a random Qwen-72B-shaped GPTQ Int4
checkpoint (about 41 GB), written to local disk in the release layout, each run through the CLI on MMLU.

    python -m bench.family --vocab VOCAB --data-dir DATA [--only 14b|72b-int4] [--limit N] [--root DIR] [--clean]
                           [--out JSON]
    python -m bench.family --smoke --vocab VOCAB --data-dir DATA      # tiny shapes, CPU or GPU: the flow only

For each model: write it unless ROOT/<name> is complete (model.safetensors.index.json is written last), then
`python eval/runner.py --task mmlu --model ROOT/<name> ...` in a fresh process (the CLI's own code path, through
this file's --child wrapper, which adds only the peak GPU memory PyTorch saw). Prints a table and writes every
number to --out (default bench/results/family.json; merged with what earlier calls wrote there), with date
and device.

Writing is one shard at a time: each tensor is random bits of its dtype made on the GPU with the exponent
pinned to a small range (no inf or NaN; the weights' values do not change the speed), moved to the host and
saved. The 72B Int4 layout is Qwen-72B-Chat-Int4's: qweight/qzeros/scales/g_idx per projection, group size 128,
fp16 embeddings, norms and LM head, the GPTQ settings in config.json's quantization_config. Disk: 28 GB (14B)
+ 41 GB (72B); --clean deletes a checkpoint after its run (one GPU machine has 64 GB of disk).

Full MMLU on the 72B Int4 checkpoint outlasts one 10-minute device call: run it over several calls of one warm
machine (its disk holds the checkpoint and the run folder between them), each interrupting the CLI before the
call's limit:
    python -m bench.family --only 72b-int4 ... --stop-after 420            # writes (~2 min), serves until interrupted
    python -m bench.family --only 72b-int4 ... --stop-after 540 --resume   # again until the row has timings
The last call's row holds the timings of every call added up (results.json sums a resumed run's). The random
weights are seeded by tensor name, so a checkpoint written again on a fresh machine has the same bytes and
fingerprint: a run folder (ROOT/runs/<name>) brought from an earlier machine resumes there too.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

from model.config import ModelArgs

REPO = Path(__file__).resolve().parents[1]

RESULTS = REPO / "bench" / "results" / "family.json"
GROUP_SIZE = 128
SHARD_BYTES = 4 * 2**30
QUANTIZED = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")
# name -> (config.json keys that differ from Qwen-7B v1.1, quantized); values as in the released config.json
MODELS = {
    "qwen-14b-bf16": ({"hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40,
                       "intermediate_size": 27392, "vocab_size": 152064, "seq_length": 2048,
                       "max_position_embeddings": 8192, "rotary_emb_base": 10000,
                       "use_dynamic_ntk": True, "use_logn_attn": True}, False),
    "qwen-72b-int4": ({"hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
                       "intermediate_size": 49152, "vocab_size": 152064, "seq_length": 32768,
                       "max_position_embeddings": 32768, "rotary_emb_base": 1000000,
                       "use_dynamic_ntk": False, "use_logn_attn": False}, True),
}
SMOKE = {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 512}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def config(keys: dict) -> dict:
    return {"architectures": ["QWenLMHeadModel"], "model_type": "qwen",
            "layer_norm_epsilon": 1e-6, "rotary_pct": 1.0, "no_bias": True, "tie_word_embeddings": False,
            **keys, "kv_channels": keys["hidden_size"] // keys["num_attention_heads"]}


def random_tensor(shape, dtype, seed: int) -> torch.Tensor:
    """Random bits of `dtype` with a small exponent: floats in ±[2^-7, 2^-6) (fp16 scales: [2^-8, 2^-7)),
    integers anything. Seeded, so a checkpoint written again (a fresh machine) has the same fingerprint and a
    run interrupted on another machine can be resumed on it."""
    n = 1
    for d in shape:
        n *= d
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    if dtype == torch.int32:
        return torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32, device=DEVICE, generator=gen).cpu()
    bits = torch.randint(-2**15, 2**15 - 1, (n,), dtype=torch.int16, device=DEVICE, generator=gen)
    pinned = (0x3C00, 0x807F) if dtype == torch.bfloat16 else (0x1C00, 0x03FF)  # (exponent, sign+mantissa mask)
    bits = (bits & pinned[1]) | pinned[0]
    return bits.view(dtype).view(shape).cpu()


def tensors(args: ModelArgs, quantized: bool):
    """(name, shape, dtype) of every stored tensor, in the release's order; norms and g_idx are made whole."""
    float_type = torch.float16 if quantized else torch.bfloat16
    d, i, v = args.dim, args.intermediate_size, args.vocab_size
    yield "transformer.wte.weight", (v, d), float_type
    for layer in range(args.n_layer):
        p = f"transformer.h.{layer}."
        yield p + "ln_1.weight", (d,), float_type
        for name, (k, n) in (("attn.c_attn", (d, 3 * d)), ("attn.c_proj", (d, d)), ("mlp.w1", (d, i)),
                             ("mlp.w2", (d, i)), ("mlp.c_proj", (i, d))):
            if quantized:
                yield p + name + ".qweight", (k // 8, n), torch.int32
                yield p + name + ".qzeros", (k // GROUP_SIZE, n // 8), torch.int32
                yield p + name + ".scales", (k // GROUP_SIZE, n), torch.float16
                yield p + name + ".g_idx", (k,), torch.int32
            else:
                yield p + name + ".weight", (n, k), float_type
            if name == "attn.c_attn":
                yield p + name + ".bias", (n,), float_type
        yield p + "ln_2.weight", (d,), float_type
    yield "transformer.ln_f.weight", (d,), float_type
    yield "lm_head.weight", (v, d), float_type


def make(name: str, shape, dtype) -> torch.Tensor:
    if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
        return torch.ones(shape, dtype=dtype)
    if name.endswith(".g_idx"):
        return (torch.arange(shape[0]) // GROUP_SIZE).to(torch.int32)
    return random_tensor(shape, dtype, seed=zlib.crc32(name.encode()))


def write_checkpoint(directory: Path, keys: dict, quantized: bool, vocab: Path) -> float:
    """The checkpoint in the v1.1 release layout, shard by shard; seconds spent (0 when it was complete)."""
    from model.config import args_from_config

    index = directory / "model.safetensors.index.json"
    if index.exists():
        return 0.0
    started = time.time()
    directory.mkdir(parents=True, exist_ok=True)
    cfg = config(keys)
    if quantized:  # as the Qwen-72B-Chat-Int4 release keeps its GPTQ settings: inside config.json
        cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": GROUP_SIZE, "damp_percent": 0.01,
                                      "desc_act": False, "static_groups": False, "sym": True, "true_sequential": True,
                                      "model_name_or_path": None, "model_file_base_name": "model"}
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.copy(vocab, directory / "qwen.tiktoken")
    parts, shard, size, total = [], {}, 0, 0
    for name, shape, dtype in tensors(args_from_config(cfg), quantized):
        shard[name] = make(name, shape, dtype)
        size += shard[name].numel() * shard[name].element_size()
        if size >= SHARD_BYTES:
            parts.append(_save(directory, len(parts) + 1, shard))
            shard, total, size = {}, total + size, 0
    if shard:
        parts.append(_save(directory, len(parts) + 1, shard))
        total += size
    weight_map = {}
    for k, names in enumerate(parts, 1):  # the release names shards -of-<count>: renamed once the count is known
        final = f"model-{k:05d}-of-{len(parts):05d}.safetensors"
        os.replace(directory / f"part-{k:05d}.safetensors", directory / final)
        weight_map.update(dict.fromkeys(names, final))
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return time.time() - started


def _save(directory: Path, k: int, shard: dict) -> list[str]:
    from safetensors.torch import save_file

    save_file(shard, directory / f"part-{k:05d}.safetensors", metadata={"format": "pt"})
    return list(shard)


def run_cli(argv: list[str], stop_after: float | None) -> dict:
    """The CLI in a fresh process (through --child); its results.json timings and the peak GPU memory. After
    stop_after seconds it is interrupted as Ctrl-C would (finished documents stay saved for a later call)."""
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "bench.family", "--child", *argv], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = proc.communicate(timeout=stop_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate()
    wall = time.time() - started
    if proc.returncode:
        raise SystemExit(f"CLI failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}")
    child = json.loads(stdout.strip().splitlines()[-1])
    return {"wall_s": round(wall, 1), **child}


def child(argv: list[str]) -> None:
    from eval.runner import main

    code = main(argv)
    if code == 130:  # interrupted (--stop-after): the documents served so far are saved in the run folder
        print(json.dumps({"code": code, "interrupted": True}))
        return
    out = Path(argv[argv.index("--output-dir") + 1])
    results = json.loads(next(out.rglob("results.json")).read_text())
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    reserved = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None
    print(json.dumps({"code": code, "timings": results["timings"], "n_docs": results["n_done"],
                      "acc": results["metrics"].get("acc"), "peak_allocated_gib": peak, "peak_reserved_gib": reserved}))


def bench_one(name: str, args) -> dict:
    keys, quantized = MODELS[name]
    if args.smoke:
        keys = {**keys, **SMOKE}
    directory = Path(args.root) / name
    written = write_checkpoint(directory, keys, quantized, Path(args.vocab))
    disk_gb = sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 1e9
    out = Path(args.root) / "runs" / name
    if not args.resume:
        shutil.rmtree(out, ignore_errors=True)
    argv = ["--task", "mmlu", "--model", str(directory), "--data-dir", args.data_dir, "--output-dir", str(out),
            "--no-progress", "--dtype", "bf16" if DEVICE.type == "cuda" else "fp32"]
    if args.limit:
        argv += ["--limit", str(args.limit)]
    run = run_cli(argv, args.stop_after)
    if args.clean and not run.get("interrupted"):
        shutil.rmtree(directory)
    return {"model": name, "write_s": round(written, 1), "disk_gb": round(disk_gb, 2), "limit": args.limit, **run}


def print_table(rows: list[dict]) -> None:
    print("| model | disk GB | write s | load s | MMLU docs | serve s | wall s | peak alloc GiB | peak reserved GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("interrupted"):
            print(f"| {r['model']} | {r['disk_gb']} | {r['write_s']} | interrupted after {r['wall_s']} s: "
                  "run again with --resume | | | | | |")
            continue
        t = r["timings"]
        gib = [f"{r[k]:.1f}" if r[k] is not None else "-" for k in ("peak_allocated_gib", "peak_reserved_gib")]
        print(f"| {r['model']} | {r['disk_gb']} | {r['write_s']} | {t.get('load')} | {r['n_docs']} | "
              f"{t.get('serve')} | {r['wall_s']} | {gib[0]} | {gib[1]} |")


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", required=True, help="qwen.tiktoken")
    p.add_argument("--data-dir", required=True, help="root holding mmlu/dev and mmlu/test")
    p.add_argument("--root", default="/tmp/qwen-family", help="where the checkpoints and runs go (local disk)")
    p.add_argument("--only", choices=["14b", "72b-int4"], help="one model (default: both, 14B first)")
    p.add_argument("--limit", type=int, help="first N questions of each MMLU subject (to fit a 10-minute call)")
    p.add_argument("--clean", action="store_true", help="delete each checkpoint after its run")
    p.add_argument("--smoke", action="store_true", help="tiny shapes: the script's flow only")
    p.add_argument("--stop-after", type=float, help="interrupt the CLI after this many seconds (its finished "
                   "documents stay saved): with --resume, a run longer than one device call spans several")
    p.add_argument("--resume", action="store_true", help="keep an earlier call's run folder: the CLI serves only "
                   "the documents not yet saved, and results.json adds up the timings of every call")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"JSON to merge the runs into (default {RESULTS})")
    args = p.parse_args()
    names = [n for n in MODELS if args.only is None or n.startswith(f"qwen-{args.only}")]
    rows = []
    previous = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    device = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    for name in names:
        row = {**bench_one(name, args), "device": device, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "smoke": args.smoke}
        rows.append(row)
        previous["runs"].append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(previous, indent=1))
    print_table(rows)


if __name__ == "__main__":
    main()
