"""Int4 (GPTQ) on one GPU: the fused kernel's bits against the invariant reference, greedy continuations
on a trained model, and batch-1 decode speed against BF16.

    python -m bench.int4 --tiny DIR --papers DIR                  # every part (about 8 minutes on an H100)
    python -m bench.int4 --parts bits --shapes 7b,72b             # one part
    python -m bench.int4 --parts speed --measurements generate/2048 --kernels invariant

The reference is the contract of model/gptq_triton.py: the GPTQ weight dequantized in fp32 and rounded once
to bf16, multiplied by `kernels.matmul`. Parts:
- bits: every projection shape (Qwen-7B; --shapes 72b adds Qwen-72B's), random GPTQ tensors (group 128,
  in order, and act-order for one shape). Each tiling of CANDIDATE_TILES on the largest planned batch
  (--max-rows, the engine's 16,384 tokens per forward) against the reference, then the default tiling at
  every row count 1..1,024 against the reference's rows. Also timed per tiling at a few row counts, beside
  kernels.matmul on the dequantized weight, cuBLAS and tinygemm: TILES in gptq_triton.py should take the
  fastest tiling that agrees.
- continuations: tiny-qwen-256 (--tiny, unpacked; --papers: its held-out korzen_groundtruth papers)
  rounded to nearest into the GPTQ layout (asymmetric, group 64), 100 greedy 64-token continuations and 100
  NLL samples of 256 tokens through the reference, the fused kernel (decode batches of 16 and 8 rows) and
  tinygemm, all with the invariant kernels elsewhere. Target: 100/100 identical to the reference.
- speed: the `profile` task's generate rows (batch 1, 2,048 and 8,192 tokens) on random Qwen-7B-shaped
  weights: BF16, Int4 fused Triton, Int4 tinygemm, with the invariant kernels and (--kernels) the library
  ones. Tokens/s and peak GiB.
JSON rows go to bench/results/int4-<date>.json (--out) as each part ends; a table is printed at the end.

On a device machine without ../shared, carry the tokenizer, tiny-qwen-256 and its held-out papers (35 MB):
    mkdir -p .carry/int4/tiny .carry/int4/papers && cp ../shared/models/tiny-qwen-256/*.{json,tiktoken,gz} .carry/int4/tiny/
    (cd ../shared/data/longctx_arxiv/korzen_groundtruth && cp --parents 0003/hep-ph0003058.body.txt \
      0712/0712.4385.body.txt 0910/0910.0369.body.txt 1103/1103.3685.body.txt 1111/1111.2568.body.txt \
      1209/1209.2834.body.txt 1305/1305.6565.body.txt 1312/1312.2964.body.txt 1501/1501.06674.body.txt \
      1507/1507.01828.body.txt 1511/1511.08255.body.txt 1606/1606.05885.body.txt "$OLDPWD/.carry/int4/papers")
and there: gunzip -k .carry/int4/tiny/model.safetensors.gz, then pass --tiny .carry/int4/tiny
--papers .carry/int4/papers --vocab .carry/int4/tiny/qwen.tiktoken.
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from eval.backends import NativeBackend, profile
from eval.tasks import profile as profile_task
from model import (
    ModelArgs,
    Qwen,
    QwenTokenizer,
    gptq,
    gptq_triton,
    init_weights,
    kernels,
    load_model,
    load_tokenizer,
    ops,
)
from model.engine import Engine
from model.gptq_triton import Tile

torch.set_grad_enabled(False)
REPO = Path(__file__).resolve().parents[1]
GROUP = 128
SHAPES = {  # (in, out) of each projection; w1 and w2 share a shape
    "7b": {"attn.c_attn": (4096, 12288), "attn.c_proj": (4096, 4096), "mlp.w1/w2": (4096, 11008),
           "mlp.c_proj": (11008, 4096)},
    "72b": {"attn.c_attn": (8192, 24576), "attn.c_proj": (8192, 8192), "mlp.w1/w2": (8192, 24576),
            "mlp.c_proj": (24576, 8192)},
}
# gptq_triton.TILES and other tilings of the same K order (small block_m may compile to mma.sync, 64 and up to
# wgmma: if they round differently, only one family may serve every row count, so 64-row tiles are timed at one
# row too; "weights first" tiles put the dequantized weights first in tl.dot, so a few rows no longer decide the
# instruction's shape; k_steps > 1 decode several K steps per iteration, for one row's latency)
CANDIDATE_TILES = [Tile(*t) for t in [
    (16, 16, 1, 4), (16, 16, 1, 8), (16, 16, 2, 6), (16, 16, 4, 6), (16, 16, 4, 8), (16, 32, 1, 6), (16, 32, 2, 6),
    (16, 32, 4, 4), (16, 32, 4, 8), (16, 64, 2, 6), (16, 64, 4, 4), (32, 32, 4, 4), (64, 16, 4, 4), (64, 32, 4, 6),
    (64, 64, 4, 4), (64, 128, 4, 4), (128, 128, 8, 3), (128, 256, 8, 3), (256, 128, 8, 3),
    (16, 16, 2, 6, True), (16, 32, 4, 4, True), (16, 32, 2, 6, True), (16, 64, 4, 4, True), (16, 64, 4, 6, True),
    (16, 128, 4, 4, True),
    (16, 16, 4, 4, False, 4), (16, 32, 4, 3, False, 4), (16, 16, 2, 4, False, 8), (16, 32, 4, 3, True, 4),
    (16, 64, 4, 3, True, 2), (16, 64, 8, 3, True, 4)]]


def label(tile: Tile) -> str:
    """16x32 w4 s4 [weights first] [k4]: block_m x block_n, warps, stages, K steps per iteration."""
    return (f"{tile.block_m}x{tile.block_n} w{tile.warps} s{tile.stages}" + " weights first" * tile.weights_first
            + (f" k{tile.k_steps}" if tile.k_steps > 1 else ""))


TIMED_ROWS = (1, 4, 16, 64, 256, 2048)


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def time_ms(fn) -> float:
    """Median of CUDA-graph replays (decoding replays graphs too, so no launch overhead)."""
    from triton.testing import do_bench_cudagraph

    return round(do_bench_cudagraph(fn, rep=20, return_mode="median"), 4)


# ---- part (a): bits -----------------------------------------------------------------------------------
def random_layer(k: int, n: int, act_order: bool, gen: torch.Generator) -> gptq.GPTQLinear:
    return fill_random(gptq.GPTQLinear(k, n, bias=False, group_size=GROUP, desc_act=act_order), gen)


def fill_random(layer: gptq.GPTQLinear, gen: torch.Generator) -> gptq.GPTQLinear:
    """Random codes and zero points (every int32 word is valid), scales as a 7B checkpoint's (about 2e-3)."""
    k, n, act_order = layer.in_features, layer.out_features, layer.desc_act
    layer.qweight = torch.randint(-2**31, 2**31 - 1, (k // 8, n), device="cuda", dtype=torch.int32, generator=gen)
    layer.qzeros = torch.randint(-2**31, 2**31 - 1, (k // GROUP, n // 8), device="cuda", dtype=torch.int32,
                                 generator=gen)
    layer.scales = (torch.rand(k // GROUP, n, device="cuda", generator=gen) * 3e-3 + 5e-4).half()
    g_idx = torch.arange(k, device="cuda") // GROUP
    if act_order:
        g_idx = g_idx[torch.randperm(k, device="cuda", generator=gen)]
    layer.g_idx = g_idx.to(torch.int32)
    return layer


def check_shape(name: str, layer: gptq.GPTQLinear, max_rows: int, gen: torch.Generator) -> dict:
    tensors = layer.gptq_tensors()
    x = torch.randn(max_rows, layer.in_features, device="cuda", dtype=torch.bfloat16, generator=gen)
    weight = layer.dequantize().to(torch.bfloat16)
    reference = kernels.matmul(x, weight)
    tiles = {label(t): torch.equal(gptq_triton.gptq_matmul(x, *tensors, tile=t), reference) for t in CANDIDATE_TILES}
    rows = range(1, min(1024, max_rows) + 1)
    fused_differ = [m for m in rows if not torch.equal(gptq_triton.gptq_matmul(x[:m], *tensors), reference[:m])]
    matmul_differ = [m for m in (1, 7, 16, 64, 100, 1024) if not torch.equal(kernels.matmul(x[:m], weight), reference[:m])]
    row = {"part": "bits", "shape": name, "k": layer.in_features, "n": layer.out_features, "act_order": layer.desc_act,
           "max_rows": max_rows, "tiles_equal_reference": tiles, "row_counts_checked": len(rows),
           "fused_rows_differing": fused_differ, "reference_rows_differing": matmul_differ}
    row["speed_ms"] = time_tiles(layer, weight, gen) if not layer.desc_act else None
    return row


def time_tiles(layer: gptq.GPTQLinear, weight: torch.Tensor, gen: torch.Generator) -> dict:
    """ms per product at a few row counts: each candidate tiling, the default path (fused, or the weight decoded
    then kernels.matmul past DEQUANTIZE_ROWS), kernels.matmul and cuBLAS on the bf16 weight, tinygemm."""
    codes, scale_zero, _ = gptq.int4mm_operands(layer)
    packed = torch._convert_weight_to_int4pack(gptq.pack_nibble_pairs(codes), 8)
    scale_zero = scale_zero.to(torch.bfloat16)
    products = {"bf16 kernels.matmul": lambda x: kernels.matmul(x, weight),
                "bf16 cublas": lambda x: F.linear(x, weight),
                "int4 tinygemm": lambda x: torch._weight_int4pack_mm(x, packed, GROUP, scale_zero),
                "int4 default": lambda x: gptq_triton.gptq_matmul(x, *layer.gptq_tensors()),
                "int4 decode weight + bf16 kernels.matmul": lambda x: kernels.matmul(x, decoded(layer, x).t()),
                "int4 decode weight alone": lambda x: decoded(layer, x)}
    out = {}
    for m in TIMED_ROWS:
        x = torch.randn(m, layer.in_features, device="cuda", dtype=torch.bfloat16, generator=gen)
        out[m] = {name: time_ms(partial(fn, x)) for name, fn in products.items()}
        for t in CANDIDATE_TILES:
            if t.block_m <= max(64, 4 * m):  # tiles far taller than the rows only waste work
                out[m][f"int4 fused {label(t)}"] = time_ms(partial(fused_with_tile, layer.gptq_tensors(), t, x))
    return out


def decoded(layer: gptq.GPTQLinear, x: torch.Tensor) -> torch.Tensor:
    return gptq_triton.dequantize(*layer.gptq_tensors(), x.dtype)


def fused_with_tile(tensors: tuple, tile: Tile, x: torch.Tensor) -> torch.Tensor:
    return gptq_triton.gptq_matmul(x, *tensors, tile=tile)


def part_bits(shape_sets: list[str], max_rows: int) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for shape_set in shape_sets:
        layouts = [(name, k, n, False) for name, (k, n) in SHAPES[shape_set].items()]
        layouts.append(("mlp.c_proj act-order", *SHAPES[shape_set]["mlp.c_proj"], True))
        for name, k, n, act_order in layouts:
            rows.append(check_shape(f"{shape_set} {name}", random_layer(k, n, act_order, gen), max_rows, gen))
            print({key: v for key, v in rows[-1].items() if key != "speed_ms"}, flush=True)
            free()
    return rows


def recommended_tiles(bits_rows: list[dict]) -> dict:
    """Per timed row count: the tiling with the least total time over the 7B shapes, among tilings that
    equal the reference on every shape."""
    agree = [t for t in map(label, CANDIDATE_TILES) if all(r["tiles_equal_reference"][t] for r in bits_rows)]
    timed = [r["speed_ms"] for r in bits_rows if r["speed_ms"] and r["shape"].startswith("7b")]
    best = {}
    for m in TIMED_ROWS:
        totals = {t: sum(s[m].get(f"int4 fused {t}", float("inf")) for s in timed) for t in agree}
        if totals:
            best[m] = min(totals, key=totals.get)
    return {"tilings_agreeing_everywhere": agree, "fastest_agreeing_by_rows": best}


# ---- part (b): continuations on tiny-qwen-256 ------------------------------------------------------------
TINY_GROUP, SAMPLE_LEN, N_SAMPLES, PROMPT_LEN, NEW_TOKENS, DECODE_ROWS = 64, 256, 100, 64, 64, 16
HELD_OUT = ["0003/hep-ph0003058", "0712/0712.4385", "0910/0910.0369", "1103/1103.3685", "1111/1111.2568",
            "1209/1209.2834", "1305/1305.6565", "1312/1312.2964", "1501/1501.06674", "1507/1507.01828",
            "1511/1511.08255", "1606/1606.05885"]


def quantize_rtn(weight: torch.Tensor, group_size: int) -> dict:
    """Round to nearest into AutoGPTQ's layout, asymmetric min/max per group (zero in 1..15: AutoGPTQ stores
    zero - 1, so 0 cannot be held), groups in input order."""
    n, k = weight.shape
    w = weight.float().t().reshape(k // group_size, group_size, n)  # [G, group, N]
    lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
    scales = ((hi - lo) / 15).clamp(min=1e-6).half()
    zeros = torch.round(-lo / scales.float()).clamp(1, 15).long()
    codes = (torch.round(w / scales.float()[:, None]) + zeros[:, None]).clamp(0, 15).reshape(k, n)
    return {"qweight": gptq.pack_int4(codes, dim=0), "qzeros": gptq.pack_int4(zeros - 1, dim=1), "scales": scales,
            "g_idx": (torch.arange(k, device=weight.device) // group_size).to(torch.int32)}


def quantized_tiny(path: str) -> Qwen:
    """tiny-qwen-256 in bf16 with every block's projections replaced by their GPTQ rounding."""
    model = load_model(path, dtype="bf16", device="cuda")
    linears = {(i, name): block.get_submodule(name) for i, block in enumerate(model.transformer.h)
               for name in gptq.QUANTIZED}
    gptq.quantize_linears(model, gptq.GPTQConfig(4, TINY_GROUP, False, "bench.int4"))
    for (i, name), linear in linears.items():
        layer = model.transformer.h[i].get_submodule(name).to("cuda")
        for attr, tensor in quantize_rtn(linear.weight.detach(), TINY_GROUP).items():
            setattr(layer, attr, tensor)
        layer.bias = linear.bias
    return model


def held_out_samples(tok, papers: Path) -> tuple[list[list[int]], list[list[int]]]:
    """100 NLL samples of 256 tokens and 100 prompts of 64 tokens over the 12 held-out papers."""
    docs = [tok.encode((papers / f"{p}.body.txt").read_text()) for p in HELD_OUT]
    nll, prompts = [], []
    for j in range(N_SAMPLES):
        doc, round_ = docs[j % len(docs)], j // len(docs)
        nll.append(doc[round_ * SAMPLE_LEN:(round_ + 1) * SAMPLE_LEN])
        base = len(doc) // 2 + round_ * 2 * PROMPT_LEN  # prompts from the second half, away from the NLL windows
        prompts.append(doc[base:base + PROMPT_LEN])
    return nll, prompts


def serve(model, nll_samples, prompts, rows: int) -> dict:
    model.ops = ops.select("invariant", "cuda")  # the batch-invariant op set for every non-Int4 layer
    engine = Engine(model, progress=False, max_batch=rows)
    nll = [n for n, _ in engine.loglikelihood(nll_samples)]
    tokens = [g.tokens for g in engine.generate(prompts, [NEW_TOKENS] * len(prompts), [[]] * len(prompts))]
    return {"nll": nll, "tokens": tokens}


def part_continuations(tiny: str, papers: str) -> list[dict]:
    model = quantized_tiny(tiny)
    nll_samples, prompts = held_out_samples(load_tokenizer(tiny), Path(papers))
    runs = {"reference": serve(model, nll_samples, prompts, DECODE_ROWS)}
    gptq.use_int4mm(model, "triton")
    runs["fused, 16 rows"] = serve(model, nll_samples, prompts, DECODE_ROWS)
    runs["fused, 8 rows"] = serve(model, nll_samples, prompts, 8)
    runs["fused, 1 row"] = serve(model, nll_samples, prompts, 1)
    gptq.use_int4mm(model, "tinygemm")
    runs["tinygemm"] = serve(model, nll_samples, prompts, DECODE_ROWS)
    reference = runs.pop("reference")
    out = []
    for name, run in runs.items():
        rel = [abs(a - b) / abs(b) for a, b in zip(run["nll"], reference["nll"])]
        out.append({"part": "continuations", "path": name, "paths_int4": gptq.int4_path(model),
                    "identical_continuations": sum(a == b for a, b in zip(run["tokens"], reference["tokens"])),
                    "identical_nll": sum(a == b for a, b in zip(run["nll"], reference["nll"])),
                    "max_nll_relative_difference": max(rel), "of": len(prompts)})
        print(out[-1], flush=True)
    return out


# ---- part (c): speed ----------------------------------------------------------------------------------
def random_int4_model() -> Qwen:
    """Qwen-7B-shaped, GPTQ layers built straight from random tensors (never a whole bf16 model)."""
    with torch.device("meta"):
        model = Qwen(ModelArgs())
        gptq.quantize_linears(model, gptq.GPTQConfig(4, GROUP, False, "bench.int4"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, p in list(model.named_parameters()):  # embeddings, norms, LM head, c_attn's bias
        value = torch.empty(p.shape, dtype=torch.bfloat16, device="cuda")
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            value.fill_(1.0)
        else:
            value.normal_(0, 0.02, generator=gen)
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(value, requires_grad=False))
    for layer in model.modules():
        if isinstance(layer, gptq.GPTQLinear):
            fill_random(layer, gen)
    return model.eval()


def profile_rows(model: Qwen, tok, name: str, kernel_set: str, only: list[str]) -> list[dict]:
    task = profile_task.TASK
    docs = [d for d in task.load(None, "fewshot") if d.doc_id.removeprefix("profile/") in only]
    requests = [task.requests(d, tok, "fewshot", {})[0] for d in docs]
    resident = round(torch.cuda.memory_allocated() / 2**30, 2)
    backend = NativeBackend(model, tok, progress=False, kernels=kernel_set)
    out = []
    for doc, r in zip(docs, profile(backend, requests)):
        out.append({"part": "speed", "model": name, "kernels": kernel_set, "int4_path": gptq.int4_path(model),
                    "int4_one_row_tile": label(gptq_triton.tile_for(1)),
                    "measurement": doc.doc_id.removeprefix("profile/"), "tokens_per_s": round(r.tokens / r.seconds, 2),
                    "peak_gib": round(r.peak_memory_gb, 2), "resident_gib": resident})
        print(out[-1], flush=True)
    return out


def part_speed(vocab: str, only: list[str], kernel_sets: list[str]) -> list[dict]:
    tok = QwenTokenizer(vocab)
    rows = []
    with torch.device("cuda"):
        model = Qwen(ModelArgs()).to(torch.bfloat16)
    init_weights(model, std=0.02, seed=0).eval()
    for kernel_set in kernel_sets:
        rows += profile_rows(model, tok, "bf16", kernel_set, only)
    del model
    free()
    model = random_int4_model()
    gptq.use_int4mm(model, "triton")
    for kernel_set in kernel_sets:
        rows += profile_rows(model, tok, "int4 triton", kernel_set, only)
    gptq.use_int4mm(model, "tinygemm")  # repacks for good: last
    free()
    for kernel_set in kernel_sets:
        rows += profile_rows(model, tok, "int4 tinygemm", kernel_set, only)
    return rows


def speed_table(rows: list[dict]) -> None:
    print("\n| model | kernels | measurement | tokens/s | vs BF16 same kernels | peak GiB |\n|---|---|---|---|---|---|")
    bf16 = {(r["kernels"], r["measurement"]): r["tokens_per_s"] for r in rows if r["model"] == "bf16"}
    for r in rows:
        ratio = r["tokens_per_s"] / bf16[r["kernels"], r["measurement"]] if (r["kernels"], r["measurement"]) in bf16 else None
        print(f"| {r['model']} | {r['kernels']} | {r['measurement']} | {r['tokens_per_s']} | "
              f"{'-' if ratio is None else f'{ratio:.2f}x'} | {r['peak_gib']} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="bits,continuations,speed")
    p.add_argument("--shapes", default="7b", help="bits: 7b, 72b or both (comma-separated)")
    p.add_argument("--max-rows", type=int, default=16384, help="bits: the largest planned batch (rows per forward)")
    p.add_argument("--tiny", help="continuations: an unpacked tiny-qwen-256 directory")
    p.add_argument("--papers", help="continuations: the korzen_groundtruth folder (held-out .body.txt files)")
    p.add_argument("--vocab", default=str(REPO.parent / "shared" / "qwen" / "qwen.tiktoken"), help="speed: qwen.tiktoken")
    p.add_argument("--measurements", default="generate/2048,generate/8192", help="speed: profile rows")
    p.add_argument("--kernels", default="invariant,fast", help="speed: kernel sets of the engine")
    p.add_argument("--fastest-one-row-tile", action="store_true",
                   help="speed: decode with the fastest tiling at one row that agreed everywhere in this run's bits part")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / f"int4-{time.strftime('%Y-%m-%d-%H%M')}.json"))
    args = p.parse_args()
    parts = args.parts.split(",")
    if "continuations" in parts and not (args.tiny and args.papers):
        p.error("--parts continuations needs --tiny and --papers")
    if args.fastest_one_row_tile and not {"bits", "speed"} <= set(parts):
        p.error("--fastest-one-row-tile needs --parts bits,speed")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "args": vars(args), "rows": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if "bits" in parts:
        bits = part_bits(args.shapes.split(","), args.max_rows)
        result["rows"] += bits
        result["tiles"] = recommended_tiles(bits)
        out.write_text(json.dumps(result, indent=1))
    if "continuations" in parts:
        result["rows"] += part_continuations(args.tiny, args.papers)
        out.write_text(json.dumps(result, indent=1))
    if args.fastest_one_row_tile:
        fastest = {label(t): t for t in CANDIDATE_TILES}[result["tiles"]["fastest_agreeing_by_rows"][1]]
        gptq_triton.TILES = (fastest, *gptq_triton.TILES[1:])
    if "speed" in parts:
        result["rows"] += part_speed(args.vocab, args.measurements.split(","), args.kernels.split(","))
        out.write_text(json.dumps(result, indent=1))
    summary(result)
    print(f"\nrows: {out}")


def summary(result: dict) -> None:
    rows = result["rows"]
    for r in (r for r in rows if r["part"] == "bits"):
        bad = [t for t, same in r["tiles_equal_reference"].items() if not same]
        print(f"bits {r['shape']}: fused rows differing {len(r['fused_rows_differing'])}/{r['row_counts_checked']}, "
              f"tilings differing at {r['max_rows']} rows: {bad or 'none'}")
    if "tiles" in result:
        print("tiles:", json.dumps(result["tiles"]))
    for r in (r for r in rows if r["part"] == "continuations"):
        print(f"continuations {r['path']}: {r['identical_continuations']}/{r['of']} identical, "
              f"NLL identical {r['identical_nll']}/{r['of']}, max NLL rel. difference {r['max_nll_relative_difference']:.2e}")
    if any(r["part"] == "speed" for r in rows):
        speed_table([r for r in rows if r["part"] == "speed"])


if __name__ == "__main__":
    main()
