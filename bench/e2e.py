"""From command to table: the CLI timed end to end on a random Qwen-7B-shaped checkpoint (issue 26).

    python -m bench.e2e --data DIR [--parts disk,mmlu1,mmlu,gsm8k,peer] [--out bench/results]

DIR holds mmlu/, gsm8k/ (the release layouts, as ../shared/data) and qwen.tiktoken. The checkpoint (bf16,
v1.1 layout: HF-style keys, 8 safetensors shards and their index, like the release; 15.4 GB) is written to
--ckpt on local disk unless it is there already. Parts, each a few minutes on an H100:
  disk   the checkpoint read once cold (O_DIRECT, else after dropping the page cache as root) and once warm
  hash   the first shard read from the page cache alone, then hashed as read: xxh3-128 (the loader's), blake2b
  load   load_model in this process, as a run loads, then with the fingerprint's hashing made a no-op: whether
         the hash (one thread, in file order) bounds the load
  mmlu1  --task mmlu --limit 1 (57 documents), then its plots drawn in a fresh process (what --plots adds)
         and the floor of any GPU process (python, torch, one tensor on the device)
  mmlu   full --task mmlu (14,042)
  gsm8k  full --task gsm8k (1,319)                  peer   --backend hf against native on the same documents:
         MMLU --limit --peer-mmlu-limit per subject and GSM8K's first --peer-gsm8k-limit problems
         (both without dynamic NTK / LogN, which transformers' Qwen2 lacks)
Every command runs `python eval/runner.py ...` as a subprocess into its own output folder, after the page cache
holds the checkpoint, with byte-code and matplotlib's font list cached as on an installed machine (see
installed_env). Its results.json timings give load / plan / serve / write;
other = wall - every timing. Prints one table (with disk GB/s and the hf/native ratios) and writes its rows as
JSON under --out. --profile runs each command under cProfile (slower) and adds its slowest calls to its row:
where a fixed cost hides.
"""
from __future__ import annotations

import argparse
import datetime
import json
import mmap
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PARTS = ("disk", "hash", "load", "mmlu1", "mmlu", "gsm8k", "peer")
SHARDS = 8
# Qwen-7B v1.1's config.json (the keys the loader reads), as released
QWEN_7B = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen", "hidden_size": 4096, "intermediate_size": 22016,
           "kv_channels": 128, "layer_norm_epsilon": 1e-06, "max_position_embeddings": 32768, "no_bias": True,
           "num_attention_heads": 32, "num_hidden_layers": 32, "rotary_emb_base": 10000, "rotary_pct": 1.0,
           "seq_length": 8192, "tie_word_embeddings": False, "use_dynamic_ntk": True, "use_logn_attn": True,
           "vocab_size": 151936}
TINY = {**QWEN_7B, "hidden_size": 64, "intermediate_size": 192, "kv_channels": 16, "num_attention_heads": 4,
        "num_hidden_layers": 2}  # --tiny: the same script on a CPU in seconds


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="folder with mmlu/, gsm8k/ and qwen.tiktoken")
    p.add_argument("--ckpt", type=Path, default=REPO / "scratch" / "e2e-qwen-7b-random", help="checkpoint folder")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--peer-mmlu-limit", type=int, default=20, help="MMLU documents per subject of the peer rows")
    p.add_argument("--peer-gsm8k-limit", type=int, default=128, help="GSM8K problems of the peer rows")
    p.add_argument("--runner-args", default="", help="appended to every command (e.g. '--device cpu')")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide checkpoint: try the script on a CPU")
    p.add_argument("--profile", action="store_true",
                   help="run each command under cProfile and add its slowest calls (cumulative s) to its row")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="folder for the JSON rows")
    args = p.parse_args(argv)
    args.parts = [x for x in args.parts.split(",") if x]
    unknown = [x for x in args.parts if x not in PARTS]
    if unknown:
        p.error(f"--parts: unknown {', '.join(unknown)} (choose from {', '.join(PARTS)})")
    for name in ("mmlu", "gsm8k", "qwen.tiktoken"):
        if not (args.data / name).exists():
            p.error(f"--data {args.data}: no {name}")
    return args


# ---- the checkpoint -------------------------------------------------------------------------------------
def write_checkpoint(ckpt: Path, config: dict, vocab: Path) -> float:
    """Random bf16 weights (std 0.02, norms 1) in SHARDS safetensors files of about equal size; seconds taken."""
    from safetensors.torch import save_file

    from model import Qwen
    from model.config import args_from_config

    started = time.time()
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in Qwen(args_from_config(config)).state_dict().items()}
    total = sum(torch.Size(s).numel() * 2 for s in shapes.values())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device).manual_seed(0)
    tmp = ckpt.with_name(ckpt.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map, shard, size = {}, {}, 0
    for i, (name, shape) in enumerate(sorted(shapes.items())):
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            shard[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            shard[name] = (torch.randn(shape, generator=generator, device=device) * 0.02).to(torch.bfloat16).cpu()
        size += shard[name].numel() * 2
        if size >= total * (len(set(weight_map.values())) + 1) / SHARDS or i == len(shapes) - 1:
            file = f"model-{len(set(weight_map.values())) + 1:05d}-of-{SHARDS:05d}.safetensors"
            save_file(shard, tmp / file, metadata={"format": "pt"})
            weight_map.update({n: file for n in shard})
            shard = {}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(vocab, tmp / "qwen.tiktoken")
    os.sync()
    tmp.rename(ckpt)
    return time.time() - started


# ---- the disk ---------------------------------------------------------------------------------------------
CHUNK = 64 * 2**20


def read_speed(files: list[Path], direct: bool) -> float:
    """GB/s of one sequential read of the files, CHUNK bytes at a time (O_DIRECT needs an aligned buffer)."""
    buffer = mmap.mmap(-1, CHUNK)  # page-aligned
    total, started = 0, time.perf_counter()
    for path in files:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        try:
            while n := os.readv(fd, [buffer]):
                total += n
        finally:
            os.close(fd)
    return total / (time.perf_counter() - started) / 1e9


def disk_rows(ckpt: Path) -> list[dict]:
    files = sorted(ckpt.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files) / 1e9
    rows = []
    try:
        cold, how = read_speed(files, direct=True), "O_DIRECT"
    except OSError:  # a file system without O_DIRECT (tmpfs, some overlays): drop the page cache instead
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            cold, how = read_speed(files, direct=False), "after drop_caches"
        except OSError:
            cold, how = None, "not measured (no O_DIRECT, not root)"
    rows.append({"command": f"read {size:.1f} GB cold ({how})", "gb_per_s": cold,
                 "seconds": size / cold if cold else None})
    read_speed(files, direct=False)  # into the page cache
    warm = read_speed(files, direct=False)
    rows.append({"command": f"read {size:.1f} GB warm (page cache)", "gb_per_s": warm, "seconds": size / warm})
    return rows


def hash_rows(ckpt: Path) -> list[dict]:
    """One shard read warm in CHUNK pieces, alone and hashed as read: what the fingerprint adds to a read."""
    import hashlib

    import xxhash

    path = min(ckpt.glob("*.safetensors"))
    read_speed([path], direct=False)  # into the page cache
    rows = []
    for name, make in (("read only", None), ("read + xxh3-128", xxhash.xxh3_128),
                       ("read + blake2b", lambda: hashlib.blake2b(digest_size=16))):
        buffer, digest = bytearray(CHUNK), make() if make else None
        started = time.perf_counter()
        with path.open("rb", buffering=0) as f:
            while n := f.readinto(buffer):
                if digest:
                    digest.update(memoryview(buffer)[:n])
        seconds = time.perf_counter() - started
        rows.append({"command": f"{name}, {path.name} warm", "seconds": round(seconds, 2),
                     "gb_per_s": path.stat().st_size / seconds / 1e9})
    return rows


def load_rows(ckpt: Path) -> list[dict]:
    """load_model timed in this process (bf16, the first GPU), with the fingerprint, then without its hashing."""
    from unittest import mock

    from model import loading

    class NoHash:
        def update(self, data):
            pass

        def digest(self):
            return b""

        def hexdigest(self):
            return ""

    rows = []
    as_read = "load_model (fingerprint as read)"
    for name, patch in ((as_read, None), ("load_model, hashing off", NoHash), (as_read, None)):  # first use, once
        with mock.patch.object(loading.xxhash, "xxh3_128", patch or loading.xxhash.xxh3_128):
            started = time.perf_counter()
            model = loading.load_model(ckpt, dtype="bf16", device="cuda")
            rows.append({"command": name, "seconds": round(time.perf_counter() - started, 2)})
        del model
        torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ---- the commands -----------------------------------------------------------------------------------------
def commands(args) -> list[tuple[str, list[str]]]:
    peer = ["--no-dynamic-ntk", "--no-logn"]
    mmlu_peer, gsm8k_peer = ["--task", "mmlu", "--limit", str(args.peer_mmlu_limit)], \
        ["--task", "gsm8k", "--limit", str(args.peer_gsm8k_limit)]
    table = {
        "mmlu1": [("mmlu --limit 1", ["--task", "mmlu", "--limit", "1"])],
        "mmlu": [("mmlu", ["--task", "mmlu"])],
        "gsm8k": [("gsm8k", ["--task", "gsm8k"])],
        "peer": [(f"mmlu --limit {args.peer_mmlu_limit} native (peer docs)", mmlu_peer + peer),
                 (f"mmlu --limit {args.peer_mmlu_limit} --backend hf", mmlu_peer + peer + ["--backend", "hf"]),
                 (f"gsm8k --limit {args.peer_gsm8k_limit} native (peer docs)", gsm8k_peer + peer),
                 (f"gsm8k --limit {args.peer_gsm8k_limit} --backend hf", gsm8k_peer + peer + ["--backend", "hf"])],
    }
    return [row for part in args.parts if part in table for row in table[part]]


def run_cli(label: str, flags: list[str], args, out: Path) -> dict:
    """One CLI command in a fresh output folder: wall time and its results.json timings."""
    folder = out / label.replace(" ", "_").replace("-", "")
    shutil.rmtree(folder, ignore_errors=True)
    argv = [sys.executable, str(REPO / "eval" / "runner.py"), *flags, "--model", str(args.ckpt), "--data-dir",
            str(args.data), "--output-dir", str(folder), "--no-progress", *args.runner_args.split()]
    profile = out / (folder.name + ".prof") if args.profile else None
    if profile:
        argv[1:2] = ["-m", "cProfile", "-o", str(profile), "-m", "eval.runner"]
    started = time.perf_counter()
    done = subprocess.run(argv, check=False, cwd=REPO, capture_output=True, text=True, env=installed_env())
    wall = time.perf_counter() - started
    row = {"command": label, "argv": " ".join(argv[1:]), "wall": round(wall, 2), "rc": done.returncode}
    if done.returncode:
        row["error"] = (done.stderr.strip().splitlines() or ["?"])[-1]
        return row
    timings = json.loads(next(folder.rglob("results.json")).read_text())["timings"]
    row.update({k: timings.get(k, 0.0) for k in ("load", "plan", "serve", "write")})
    row["other"] = round(wall - sum(v for v in timings.values() if isinstance(v, (int, float))), 2)
    if profile:
        row["slowest_calls"] = slowest_calls(profile)
    return row


def installed_env() -> dict:
    """The environment of every timed process: byte-code and matplotlib's font list cached under scratch/ (the
    first process writes them), as on a machine where pip compiled the packages and the caches are writable.
    The lent GPU's image has no byte-code for its site-packages and sets PYTHONDONTWRITEBYTECODE: each process
    there compiled some 900 modules afresh (3 s in a profile)."""
    cache = REPO / "scratch" / "e2e-caches"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONPYCACHEPREFIX": str(cache / "pycache"), "MPLCONFIGDIR": str(cache / "matplotlib")}


def fresh_process_row(label: str, code: str) -> dict:
    """`python -c code` in a fresh process, timed whole (start, imports, exit)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=installed_env(), capture_output=True, text=True)
    return {"command": label, "rc": done.returncode, "wall": round(time.perf_counter() - started, 2),
            **({"error": done.stderr[-300:]} if done.returncode else {})}


def floor_row() -> dict:
    """What any run pays before its own work: interpreter, torch, the CUDA context, and its teardown at exit."""
    return fresh_process_row("python -c 'import torch; one tensor on the device' (the floor)",
                             "import torch; torch.zeros(1, device='cuda' if torch.cuda.is_available() else 'cpu').sum().item()")


def plot_row(run_dir: Path) -> dict:
    """The plots of a finished run drawn in a fresh process: what --plots adds to a run."""
    return fresh_process_row(f"plots of {run_dir.parent.parent.name} (a fresh process)",
                             f"from eval.report import plot_run; plot_run(__import__('pathlib').Path({str(run_dir)!r}))")


def slowest_calls(path: Path, n: int = 40) -> list[str]:
    """The n calls with the most cumulative time in a cProfile file (import machinery left out), then the n/2
    with the most time of their own: where a fixed cost hides."""
    import pstats

    stats = {(file, line, name): (own, cumulative) for (file, line, name), (_, _, own, cumulative, _)
             in pstats.Stats(str(path)).stats.items() if "importlib" not in file and not file.startswith("<frozen")}

    def top(column: int, count: int, kind: str) -> list[str]:
        ranked = sorted(stats.items(), key=lambda item: -item[1][column])[:count]
        return [f"{times[column]:8.2f} s {kind}  {Path(file).name}:{line}({name})" for (file, line, name), times in ranked]

    return top(1, n, "cumulative") + top(0, n // 2, "own")


def ratios(rows: list[dict]) -> list[str]:
    lines = []
    for task in ("mmlu", "gsm8k"):
        native = next((r for r in rows if r["command"].startswith(task) and "native (peer" in r["command"]), None)
        peer = next((r for r in rows if r["command"].startswith(task) and "--backend hf" in r["command"]), None)
        if native and peer and native.get("serve") and peer.get("serve"):
            lines.append(f"{task}: hf/native serve {peer['serve'] / native['serve']:.1f}x, "
                         f"wall {peer['wall'] / native['wall']:.1f}x")
    return lines


def render(rows: list[dict], device: str) -> str:
    def cell(value):
        return "" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = [f"{datetime.date.today()} on {device}", "",
             "| command | wall s | load | plan | serve | write | other | GB/s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        wall = r.get("wall", r.get("seconds"))
        name = r["command"] + (f" (FAILED rc {r['rc']}: {r['error']})" if r.get("rc") else "")
        lines.append(f"| {name} | {cell(wall)} | " + " | ".join(cell(r.get(k)) for k in
                                                              ("load", "plan", "serve", "write", "other", "gb_per_s"))
                     + " |")
    return "\n".join(lines + [""] + ratios(rows))


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rows = []
    if not (args.ckpt / "model.safetensors.index.json").exists():
        seconds = write_checkpoint(args.ckpt, TINY if args.tiny else QWEN_7B, args.data / "qwen.tiktoken")
        print(f"wrote {args.ckpt} in {seconds:.0f} s", flush=True)
    if "disk" in args.parts:
        rows += disk_rows(args.ckpt)
    else:
        read_speed(sorted(args.ckpt.glob("*.safetensors")), direct=False)  # the rows below load from the page cache
    if "hash" in args.parts:
        rows += hash_rows(args.ckpt)
    if "load" in args.parts:
        rows += load_rows(args.ckpt)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compileall", "-q", "eval", "model"], cwd=REPO, check=True, env=installed_env())
    print(f"compiled the sources in {time.perf_counter() - started:.1f} s (a fresh machine pays this once)")
    out = REPO / "scratch" / "e2e-runs"  # the runs themselves stay on the machine
    for label, flags in commands(args):
        rows.append(run_cli(label, flags, args, out))
        print(json.dumps(rows[-1]), flush=True)
        if label == "mmlu --limit 1" and not rows[-1]["rc"]:
            rows += [plot_row(next((out / "mmlu_limit_1").rglob("results.json")).parent), floor_row()]
            print(json.dumps(rows[-2:]), flush=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"e2e-{stamp}.json"
    path.write_text(json.dumps({"date": stamp, "device": device, "torch": torch.__version__, "rows": rows}, indent=2))
    print(render(rows, device))
    print(f"rows written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
