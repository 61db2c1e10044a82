"""The batch-invariant products and decode attention, proven bit by bit on the GPU (a benchmark, not a test).

    python -m bench.kernel_bits                      # bits sweep and timings, JSON under bench/results/
    python -m bench.kernel_bits --shapes 7b --max-rows 64   # a quick look

Products (kernels.linear, cuBLASLt pinned by kernels.pin_library_matmuls, and the Triton kernels.matmul):
for every weight shape of the Qwen family, a product of each row count from 1 to --max-rows must give each
row the bits it has in the product of --largest rows (the most rows one forward of the engine plans), for
rows taken at two offsets. Triton tilings (small ones run mma.sync, large ones wgmma) must agree too.
Decode attention (kernels.decode_attention): a row's output is the same alone, among other rows, in a
cache of more slots, and with its prefix shared, at cache lengths across several splits.

Timings per product: device time of CUDA-graphed calls (as in the engine's decode step) and wall time per
call of eager calls in a row (host included: a small scoring forward is not graphed); the pinned products
in this process, the library's default cuBLAS (split-K allowed) in a child process, since the pinning is
process-wide.
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from model import kernels

# (N, K, bias) of every product of each size: c_attn (fused q, k, v; biased), attention c_proj, w1/w2,
# MLP c_proj, LM head. Sizes from the family's config.json files (EVALUATION.md, "The Qwen family").
SHAPES = {
    "1.8b": [(6144, 2048, True), (2048, 2048, False), (5504, 2048, False), (2048, 5504, False), (151936, 2048, False)],
    "7b": [(12288, 4096, True), (4096, 4096, False), (11008, 4096, False), (4096, 11008, False), (151936, 4096, False)],
    "14b": [(15360, 5120, True), (5120, 5120, False), (13696, 5120, False), (5120, 13696, False), (152064, 5120, False)],
    "72b": [(24576, 8192, True), (8192, 8192, False), (24576, 8192, False), (8192, 24576, False), (152064, 8192, False)],
}
TIMED_ROWS = (1, 16, 64, 256, 2048, 16384)


# the batch-invariant products: cuBLASLt pinned (kernels.linear, BF16 layers) and the Triton matmul (its
# own K order, tile by row count; the Int4 kernel's contract)
def gemm_pinned(x, weight, bias=None):
    """kernels.linear through cuBLAS's classic GEMM API instead of cuBLASLt (same pins): a candidate for less
    host time per call than cuBLASLt's per-call heuristic query, if its rows prove invariant too."""
    torch.backends.cuda.preferred_blas_library("cublas")
    try:
        return kernels.linear(x, weight, bias)
    finally:
        torch.backends.cuda.preferred_blas_library("cublaslt")


PRODUCTS = {"cublas_pinned": kernels.linear, "cublas_gemm_pinned": gemm_pinned, "triton": kernels.matmul}


def sweep_shape(n: int, k: int, has_bias: bool, max_rows: int, largest: int, products, gen) -> dict:
    """Row counts 1..max_rows whose rows differ from the same rows (at two offsets) in the largest product."""
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen) if has_bias else None
    x = torch.randn(largest, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    result = {"n": n, "k": k, "bias": has_bias, "largest": largest}
    for name in products:
        product = PRODUCTS[name]
        whole = product(x, w, bias)
        differing = []
        for m in range(1, max_rows + 1):
            for offset in (0, largest - m - 3):
                if not torch.equal(product(x[offset:offset + m], w, bias), whole[offset:offset + m]):
                    differing.append(m)
                    break
        result[name] = differing
        del whole
    return result


# (BLOCK_M, BLOCK_N, warps, stages) of the Triton matmul: small tiles (mma.sync) and large (wgmma) must
# give the same bits for the Int4 kernel, which shares this K order, to pick its tiles freely
TIMING_TILES = [(16, 16, 4, 4), (16, 32, 4, 4), (16, 64, 4, 4), (32, 32, 4, 4), (64, 64, 4, 4), (64, 32, 4, 4),
                (128, 128, 8, 3), (256, 128, 8, 3), (128, 256, 8, 3), (128, 256, 8, 4), (256, 128, 8, 4),
                (128, 128, 4, 4), (256, 64, 8, 4)]
TRITON_TILES = [(16, 16, 4, 4), (16, 32, 4, 4), (16, 64, 4, 4), (32, 32, 4, 4), (64, 64, 4, 4), (128, 128, 8, 3),
                (256, 128, 8, 3)]


def check_triton_tiles(shapes, gen) -> list[dict]:
    rows = []
    for n, k, _ in shapes:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        x = torch.randn(300, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        outs = {tile: kernels.matmul(x, w, tile=tile) for tile in TRITON_TILES}
        reference = outs[(64, 64, 4, 4)]
        rows.append({"n": n, "k": k, "tiles_differing": [str(t) for t, o in outs.items() if not torch.equal(o, reference)]})
        print(rows[-1], flush=True)
    return rows


def graph_ms(fn, calls: int = 20, reps: int = 5) -> float:
    """Device time of one call: `calls` calls captured in a CUDA graph, replayed (no launch overhead,
    as in the engine's graphed decode step); the median of `reps` replays."""
    fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def eager_ms(fn, calls: int = 200) -> float:
    """Wall time per call of `calls` eager calls in a row: the host's cost per launch where it exceeds the
    device's (as in a small scoring forward, which is not graphed)."""
    fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1000 / calls


def varying_rows_ms(product, x, w, bias, rows: int, kinds: int = 57) -> float:
    """eager_ms with the row count cycling through `kinds` values from `rows` up, as the forwards of a small
    run (one per subject, each of its own length) do: a library that plans per shape pays its planning here."""
    views = itertools.cycle([x[: rows + i] for i in range(kinds)])
    return eager_ms(lambda: product(next(views), w, bias), calls=4 * kinds)


def time_products(shapes, library_default: bool, gen) -> list[dict]:
    rows = []
    for n, k, has_bias in shapes:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen) if has_bias else None
        for m in TIMED_ROWS:
            wide = torch.randn(m + 64, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            x = wide[:m]
            calls = 2 if m * n > 2**28 else 20
            row = {"n": n, "k": k, "m": m}
            products = {"library": torch.nn.functional.linear} if library_default else PRODUCTS
            for name, product in products.items():
                row[f"{name}_ms"] = graph_ms(lambda: product(x, w, bias), calls)
                if m <= 256:  # where the host's cost per call can show
                    row[f"{name}_eager_ms"] = eager_ms(lambda: product(x, w, bias))
                    row[f"{name}_varying_ms"] = varying_rows_ms(product, wide, w, bias, m)
            if not library_default:
                row["triton_tiles_ms"] = {str(t): round(graph_ms(lambda: kernels.matmul(x, w, bias, tile=t), calls), 4)
                                          for t in TIMING_TILES if (m <= 64) == (t[0] <= 64)}
            rows.append(row)
    return rows


def decode_batch(lengths, capacity, prefix, gen, H=32, D=128):
    B = len(lengths)
    q = torch.randn(B, 1, H, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, H, capacity, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    key_pos = torch.full((B, capacity), -1, device="cuda")
    for row, n in enumerate(lengths):
        key_pos[row, :n] = torch.arange(prefix, prefix + n, device="cuda")
    q_pos = torch.tensor([[prefix + n - 1] for n in lengths], device="cuda")
    return q, k, v, key_pos, q_pos


def check_decode_attention(gen) -> list[dict]:
    """A row alone, among 15 others, in a cache twice as long, and with a shared prefix: the same bits. The 16
    rows share their first P keys, so with the prefix held once its whole splits serve all 16 rows in one
    program (each row at another place of the tile) and every row is compared."""
    rows = []
    for length in (1, 63, 64, 511, 512, 513, 1500, 2048, 4100, 8192):
        lengths = [length] + [int(x) for x in torch.randint(1, 8192, (15,), generator=torch.Generator().manual_seed(length))]
        q, k, v, key_pos, q_pos = decode_batch(lengths, 8192 + 600, 0, gen)
        P = min(700, length - 1)  # the first P keys held once as a shared prefix
        k[:, :, :P], v[:, :, :P] = k[:1, :, :P], v[:1, :, :P]
        batched = kernels.decode_attention(q, k, v, key_pos, q_pos)
        alone = kernels.decode_attention(q[:1], k[:1, :, :length], v[:1, :, :length], key_pos[:1, :length], q_pos[:1])
        prefix = (k[0, :, :P].contiguous(), v[0, :, :P].contiguous())
        shared = kernels.decode_attention(q, k[:, :, P:], v[:, :, P:], key_pos[:, P:], q_pos, prefix)
        rows.append({"cache_length": length, "splits": -(-length // kernels.DECODE_SPLIT),
                     "alone_equals_batched": torch.equal(alone, batched[:1]),
                     "shared_prefix_equals_whole": torch.equal(shared, batched),
                     "rows_differing_with_prefix_shared": int((shared != batched).flatten(1).any(1).sum())})
        print(rows[-1], flush=True)
    return rows


def time_decode_attention(gen) -> list[dict]:
    """Batch-1 decode attention of one layer at 2,048 and 8,192 cached keys: split-KV, one pass, flash."""
    rows = []
    for length in (2048, 8192):
        q, k, v, key_pos, q_pos = decode_batch([length], length, 0, gen)
        qt = q.transpose(1, 2)
        row = {"cache_length": length}
        default = kernels.DECODE_SPLIT, kernels.DECODE_BLOCK_N
        for split, block in ((128, 64), (256, 64), (512, 64), (256, 128), (512, 128)):
            kernels.DECODE_SPLIT, kernels.DECODE_BLOCK_N = split, block
            row[f"split_{split}_block_{block}_ms"] = graph_ms(lambda: kernels.decode_attention(q, k, v, key_pos, q_pos))
        kernels.DECODE_SPLIT, kernels.DECODE_BLOCK_N = default
        rows.append({**row,
                     "one_pass_ms": graph_ms(lambda: kernels.attention(q, k, v, key_pos, q_pos, aligned=True, block_m=16)),
                     "sdpa_ms": graph_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qt, k, v))})
        print(rows[-1], flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="1.8b,7b,14b,72b")
    p.add_argument("--max-rows", type=int, default=1024)
    p.add_argument("--largest", type=int, default=16384, help="rows of the largest product (the engine's batch)")
    p.add_argument("--library-default", action="store_true", help="(child process) time the unpinned library")
    p.add_argument("--parts", default="bits,tiles,attention,timings")
    p.add_argument("--products", default=",".join(PRODUCTS))
    p.add_argument("--out", default="bench/results/kernel_bits.json")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [s for name in args.shapes.split(",") for s in SHAPES[name]]
    if args.library_default:
        print(json.dumps(time_products(SHAPES["7b"], True, gen)))
        return
    kernels.pin_library_matmuls()
    parts = args.parts.split(",")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "decode_split": kernels.DECODE_SPLIT}
    if "bits" in parts:
        products = args.products.split(",")
        result["products"] = [sweep_shape(n, k, b, args.max_rows, args.largest, products, gen) for n, k, b in shapes]
    if "tiles" in parts:
        result["triton_tiles"] = check_triton_tiles(SHAPES["7b"], gen)
    if "attention" in parts:
        result["decode_attention"] = check_decode_attention(gen)
        result["decode_attention_ms"] = time_decode_attention(gen)
    if "timings" in parts:
        pinned = time_products(SHAPES["7b"], False, gen)
        child = subprocess.run([sys.executable, "-m", "bench.kernel_bits", "--library-default"], capture_output=True,
                               text=True, check=True)
        library = json.loads(child.stdout.strip().splitlines()[-1])
        result["timings"] = [{**a, **b} for a, b in zip(pinned, library)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print_tables(result)


def print_tables(result: dict) -> None:
    if "products" in result:
        names = [k for k in PRODUCTS if k in result["products"][0]]
        print(f"\nrow counts 1..{result['products'][0]['largest']} whose rows differ from the largest product's")
        print("| N x K | bias | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names))
        for r in result["products"]:
            print(f"| {r['n']} x {r['k']} | {r['bias']} | " + " | ".join(str(r[k] or "none") for k in names) + " |")
    if "timings" in result:
        columns = [*PRODUCTS, "library"]
        print("\nms per call: device (CUDA-graphed) / eager (a run of calls, host included) / eager with the row "
              "count cycling through 57 values\n| N x K | rows | "
              + " | ".join(columns) + " | best Triton tile |\n|---|---|" + "---|" * (len(columns) + 1))
        for r in result["timings"]:
            best = min(r["triton_tiles_ms"].items(), key=lambda kv: kv[1])
            cells = " | ".join(" / ".join(f"{r[key]:.4f}" for key in (f"{c}_ms", f"{c}_eager_ms", f"{c}_varying_ms")
                                          if key in r) for c in columns)
            print(f"| {r['n']} x {r['k']} | {r['m']} | {cells} | {best[0]} {best[1]:.4f} |")
    for r in result.get("triton_tiles", []):
        print(f"Triton tiles differing from (64, 64) on {r['n']} x {r['k']}: {r['tiles_differing'] or 'none'}")
    if "decode_attention" in result:
        ok = all(r["alone_equals_batched"] and r["shared_prefix_equals_whole"] for r in result["decode_attention"])
        print(f"\ndecode attention, every cache length: {'same bits' if ok else 'DIFFERS'}")
        for r in result["decode_attention_ms"]:
            print(f"decode attention at {r['cache_length']} keys: " + ", ".join(f"{k} {v:.4f}" for k, v in r.items()
                                                                             if k.endswith("_ms")))


if __name__ == "__main__":
    main()
