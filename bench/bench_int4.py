"""Int4 (GPTQ) beside BF16 on one GPU: the README's speed and memory table, with random Qwen-7B-shaped weights.

    python -m bench.bench_int4 --vocab ../shared/qwen/qwen.tiktoken [--desc-act]
    python bench/bench_int4.py --smoke    # a small model (on the CPU when there is no GPU): the script's flow only

Prints a markdown table and writes every number (checks, profile rows, the row sweep) to --out as JSON.

Published (spec 8.3; A100-SXM4-80G, PyTorch 2.0.1, AutoGPTQ, batch 1, from 1 context token):
BF16 30.34 / 29.32 tokens/s generating 2048 / 8192 tokens, peak 17.66 GB encoding 2048 / 22.58 GB generating
8192; Int4 43.56 / 33.92 tokens/s, 8.21 / 13.62 GB.

Speed does not depend on weight values, so no checkpoint is needed. BF16 is measured first, alone, and freed;
the Int4 model is then built straight into GPTQ form (random bf16 weights one projection at a time, rounded
to nearest, symmetric, group 128: the Qwen-7B-Chat-Int4 settings), so neither model sits in the other's
peak. Before any Int4 timing the GPU kernels are checked against the dequantizing reference on the device,
per projection shape at 1 and 16 rows (Triton: dequantization bit for bit, fused product within fp32
summation order; tinygemm: against the reference and against its own arithmetic, `tinygemm_weight`), then
the whole model's logits and greedy tokens (reported: random weights amplify any difference over 32 layers).
Int4 is profiled with the Triton kernels (the default) and, for generate/2048 only, with tinygemm. Last,
every projection shape is timed over row counts (CUDA-graph replays): bf16, the fused Triton kernel,
Triton dequantization + cuBLAS, tinygemm; from the one-row times, the projections' share of a decode step.
Every stage's numbers are written to --out as soon as they exist.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import default_out, print_table, write_json
from eval.backends import NativeBackend, profile
from eval.tasks import profile as profile_task
from model import ModelArgs, Qwen, QwenTokenizer, init_weights
from model import gptq, gptq_triton
from model.engine import Engine

REPO = Path(__file__).resolve().parents[1]

torch.set_grad_enabled(False)
SMOKE = "--smoke" in sys.argv
ARGS = ModelArgs(dim=256, n_layer=2, n_head=2) if SMOKE else ModelArgs()  # Qwen-7B (original)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GROUP_SIZE = 128
PUBLISHED = {  # measurement -> ((BF16 tokens/s, peak GB), (Int4 tokens/s, peak GB))
    "generate/2048": ((30.34, None), (43.56, None)),
    "generate/8192": ((29.32, 22.58), (33.92, 13.62)),
    "encode/2048": ((None, 17.66), (None, 8.21)),
}
# relative, per projection: the fused Triton product differs from the reference only in the order of its
# fp32 additions, which moves an output by at most one bf16 step (2^-8 relative) and rarely
MAX_LAYER_ERROR = 2**-8
SHAPES = {"attn.c_attn": (4096, 12288), "attn.c_proj": (4096, 4096), "mlp.w1 / mlp.w2": (4096, 11008),
          "mlp.c_proj": (11008, 4096)}  # (in, out) of Qwen-7B's projections; w1 and w2 share a shape
SWEEP_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 2048)


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def gib_allocated() -> float | None:
    return round(torch.cuda.memory_allocated() / 2**30, 2) if DEVICE.type == "cuda" else None


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---- models ---------------------------------------------------------------------------------------
def build_bf16() -> Qwen:
    with torch.device(DEVICE):
        model = Qwen(ARGS).to(torch.bfloat16)
    return init_weights(model, std=0.02, seed=0).eval()


def quantize_symmetric(weight: torch.Tensor, desc_act: bool, gen: torch.Generator) -> dict:
    """Round to nearest into AutoGPTQ's layout, symmetric: zero 8 (stored 7), scale = 2 max|w| / 15 per group."""
    n, k = weight.shape
    g_idx = torch.arange(k, device=weight.device) // GROUP_SIZE
    if desc_act:  # act-order: a permutation of the input channels decides the groups
        g_idx = g_idx[torch.randperm(k, device=weight.device, generator=gen)]
    w = weight.float().t()  # [K, N]
    by_group = w.abs()[torch.argsort(g_idx, stable=True)].view(k // GROUP_SIZE, GROUP_SIZE, n)  # groups are equal
    absmax = by_group.amax(1)
    scales = (2 * absmax / 15).clamp(min=1e-6).half()
    codes = (torch.round(w / scales.float()[g_idx]) + 8).clamp(0, 15)
    stored_zeros = torch.full((k // GROUP_SIZE, n), 7, device=weight.device)
    return {"qweight": gptq.pack_int4(codes, dim=0), "qzeros": gptq.pack_int4(stored_zeros, dim=1),
            "scales": scales, "g_idx": g_idx.to(torch.int32)}


def build_int4(desc_act: bool) -> Qwen:
    """GPTQ layers built one at a time from random bf16 weights (never a whole bf16 model)."""
    config = gptq.GPTQConfig(bits=4, group_size=GROUP_SIZE, desc_act=desc_act, source="bench_int4")
    with torch.device("meta"):
        model = Qwen(ARGS)
        gptq.quantize_linears(model, config)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for name, p in list(model.named_parameters()):  # embeddings, norms, LM head, c_attn's bias
        value = torch.empty(p.shape, dtype=torch.bfloat16, device=DEVICE)
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            value.fill_(1.0)
        else:
            value.normal_(0, 0.02, generator=gen)
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(value, requires_grad=False))
    for layer in model.modules():
        if isinstance(layer, gptq.GPTQLinear):
            weight = torch.empty(layer.out_features, layer.in_features, dtype=torch.bfloat16, device=DEVICE)
            for attr, tensor in quantize_symmetric(weight.normal_(0, 0.02, generator=gen), desc_act, gen).items():
                setattr(layer, attr, tensor)
    return model.eval()


# ---- measurements ---------------------------------------------------------------------------------
def profile_model(model: Qwen, tok: QwenTokenizer, only: tuple[str, ...] | None = None) -> dict:
    """The `profile` task's three measurements (or `only` these): tokens/s and peak GiB, each served alone."""
    task = profile_task.TASK
    docs = [d for d in task.load(None, "fewshot") if only is None or d.doc_id.removeprefix("profile/") in only]
    requests = [task.requests(d, tok, "fewshot", {})[0] for d in docs]
    if SMOKE:
        requests = [replace(r, max_new_tokens=16) if hasattr(r, "max_new_tokens") else r for r in requests]
    out = {}
    for doc, r in zip(docs, profile(NativeBackend(model, tok, progress=False), requests)):
        out[doc.doc_id.removeprefix("profile/")] = {
            "tokens_per_s": round(r.tokens / r.seconds, 2), "seconds": round(r.seconds, 2),
            "peak_gb": None if r.peak_memory_gb is None else round(r.peak_memory_gb, 2)}  # GiB, as the task
        print(doc.doc_id, out[doc.doc_id.removeprefix("profile/")], flush=True)
    return out


def check_layers(model: Qwen) -> dict:
    """Per projection of block 0 at 1 and 16 rows: the Triton kernels against the reference (gated), and
    tinygemm against the reference and against its emulated arithmetic (reported)."""
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    checks = {}
    for name in gptq.QUANTIZED:
        layer = model.transformer.h[0].get_submodule(name)
        reference_w = layer.dequantize().to(torch.bfloat16)
        tensors = (layer.qweight, layer.scales, layer.qzeros, layer.g_idx, layer.group_size, layer.desc_act)
        row = {"triton dequantize bit for bit": torch.equal(
            gptq_triton.gptq_dequantize(*tensors, torch.bfloat16), reference_w.t())}
        codes, scale_zero, order = gptq.int4mm_operands(layer)
        emulated_w = gptq.tinygemm_weight(codes, scale_zero, layer.group_size)
        packed = torch._convert_weight_to_int4pack(gptq.pack_nibble_pairs(codes), 8)
        for rows in (1, 16):
            x = torch.randn(rows, layer.in_features, device=DEVICE, generator=gen, dtype=torch.bfloat16)
            reference = F.linear(x, reference_w)
            fused = gptq_triton.gptq_matmul(x, *tensors)
            x_sorted = x if order is None else x[:, order].contiguous()
            tiny = torch._weight_int4pack_mm(x_sorted, packed, layer.group_size, scale_zero.to(torch.bfloat16))
            row[f"{rows} rows"] = {"triton vs reference": relative_error(fused, reference),
                                   "triton outputs equal": round(float((fused == reference).float().mean()), 4),
                                   "tinygemm vs reference": relative_error(tiny, reference),
                                   "tinygemm vs tinygemm_weight": relative_error(tiny, F.linear(x_sorted, emulated_w))}
        checks[name] = row
        print(name, row, flush=True)
        worst = max(row[f"{r} rows"]["triton vs reference"] for r in (1, 16))
        if not row["triton dequantize bit for bit"] or worst > MAX_LAYER_ERROR:
            raise SystemExit(f"the Triton int4 kernels disagree with the reference on {name}: {row}")
    return checks


def check_model(model: Qwen, vocab_size: int) -> dict:
    """Whole-model logits and 32 greedy tokens, reference vs the Triton path (reported, not gated)."""
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    prompt = torch.randint(0, vocab_size, (1, 64), device=DEVICE, generator=gen)
    ref_logits = model(prompt)
    ref_tokens = Engine(model, progress=False, cuda_graphs=False).generate([prompt[0].tolist()], [32], [[]])[0].tokens
    moved = gptq.use_int4mm(model, "triton")
    logits = model(prompt)
    tokens = Engine(model, progress=False).generate([prompt[0].tolist()], [32], [[]])[0].tokens
    checks = {"layers moved to triton": f"{moved}/{len(gptq.QUANTIZED) * ARGS.n_layer}",
              "logits relative error": f"{relative_error(logits, ref_logits):.2e}",
              "argmax agreement over 64 positions": int((logits.argmax(-1) == ref_logits.argmax(-1)).sum()),
              "greedy tokens equal to the reference (of 32)": sum(a == b for a, b in zip(tokens, ref_tokens))}
    print(checks, flush=True)
    return checks


def time_ms(fn) -> float:
    """Median of CUDA-graph replays (no launch overhead: decoding replays graphs too)."""
    from triton.testing import do_bench_cudagraph
    return do_bench_cudagraph(fn, rep=20, return_mode="median")


def row_sweep(desc_act: bool, sweep_rows: tuple[int, ...]) -> dict:
    """Every projection shape over row counts: bf16, fused Triton, Triton dequantize + cuBLAS, tinygemm."""
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    out = {}
    for name, (k, n) in SHAPES.items():
        weight = torch.empty(n, k, dtype=torch.bfloat16, device=DEVICE).normal_(0, 0.02, generator=gen)
        layer = gptq.GPTQLinear(k, n, bias=False, group_size=GROUP_SIZE, desc_act=desc_act).to(DEVICE)
        for attr, tensor in quantize_symmetric(weight, desc_act, gen).items():
            setattr(layer, attr, tensor)
        tensors = (layer.qweight, layer.scales, layer.qzeros, layer.g_idx, layer.group_size, layer.desc_act)
        codes, scale_zero, _ = gptq.int4mm_operands(layer)
        packed = torch._convert_weight_to_int4pack(gptq.pack_nibble_pairs(codes), 8)
        scale_zero = scale_zero.to(torch.bfloat16)
        matmul = gptq_triton.gptq_matmul
        rows = []
        for m in sweep_rows:
            x = torch.randn(m, k, dtype=torch.bfloat16, device=DEVICE, generator=gen)
            row = {"rows": m, "bf16_ms": time_ms(lambda: F.linear(x, weight)),
                   "triton_fused_ms": time_ms(lambda: matmul(x, *tensors)),
                   "dequantize_cublas_ms": time_ms(
                       lambda: F.linear(x, gptq_triton.gptq_dequantize(*tensors, torch.bfloat16).t())),
                   "tinygemm_ms": time_ms(lambda: torch._weight_int4pack_mm(x, packed, GROUP_SIZE, scale_zero))}
            rows.append({key: round(v, 4) if isinstance(v, float) else v for key, v in row.items()})
            print(name, rows[-1], flush=True)
        out[name] = rows
    return out


def decode_step_projections(sweep: dict) -> dict:
    """ms per batch-1 decode step spent in the 32 x 5 projections (+ the bf16 LM head), from one-row times."""
    per_layer = {"attn.c_attn": 1, "attn.c_proj": 1, "mlp.w1 / mlp.w2": 2, "mlp.c_proj": 1}
    lm_head = torch.empty(ARGS.vocab_size, ARGS.dim, dtype=torch.bfloat16, device=DEVICE).normal_()
    x = torch.randn(1, ARGS.dim, dtype=torch.bfloat16, device=DEVICE)
    head_ms = time_ms(lambda: F.linear(x, lm_head))
    out = {"lm_head_ms": round(head_ms, 4)}
    for key in [key for key in sweep["mlp.c_proj"][0] if key.endswith("_ms")]:  # every kernel timed at one row
        total = sum(count * sweep[name][0][key] for name, count in per_layer.items()) * ARGS.n_layer
        out[key.replace("_ms", "_step_ms")] = round(total + head_ms, 3)
    return out


def print_comparison(bf16: dict, int4: dict) -> None:
    rows = []
    for key, (pub_bf16, pub_int4) in PUBLISHED.items():
        if key not in bf16 or key not in int4:
            continue
        cells = [bf16[key]["tokens_per_s"], bf16[key]["peak_gb"], int4[key]["tokens_per_s"], int4[key]["peak_gb"]]
        published = [" / ".join("-" if v is None else str(v) for v in pub) for pub in (pub_bf16, pub_int4)]
        rows.append([key, *cells, *published])
    print_table(("measurement", "BF16 tok/s", "BF16 peak GB", "Int4 tok/s", "Int4 peak GB",
                 "published BF16 tok/s / GB", "published Int4 tok/s / GB"), rows)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--vocab", default=str(REPO.parent / "shared" / "qwen" / "qwen.tiktoken"))
    p.add_argument("--out", default=default_out("bench_int4.json"))
    p.add_argument("--desc-act", action="store_true", help="act-order groups (the fused path then permutes inputs)")
    p.add_argument("--smoke", action="store_true", help="a small model: checks the script, measures nothing")
    p.add_argument("--parts", default="bf16,int4,tinygemm,sweep", help="which stages, in this order")
    p.add_argument("--measurements", default=",".join(PUBLISHED), help="which profile rows")
    p.add_argument("--rows", default=",".join(map(str, SWEEP_ROWS)), help="row counts of the sweep")
    args = p.parse_args()
    parts, only = args.parts.split(","), tuple(args.measurements.split(","))
    tok = QwenTokenizer(args.vocab)
    result = {"device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "desc_act": args.desc_act, "group_size": GROUP_SIZE,
              "fused_max_rows": gptq.FUSED_MAX_ROWS, "parts": parts}

    def save():
        write_json(args.out, result)

    cuda = DEVICE.type == "cuda"
    if "sweep" in parts and cuda:  # no model in memory: first
        result["row_sweep"] = row_sweep(args.desc_act, tuple(int(r) for r in args.rows.split(",")))
        result["decode_step_projections"] = decode_step_projections(result["row_sweep"])
        print(json.dumps(result["decode_step_projections"], indent=1), flush=True)
        save()
    if "bf16" in parts:
        model = build_bf16()
        result["bf16_weights_gb"] = gib_allocated()
        result["bf16"] = profile_model(model, tok, only)
        save()
        del model
        free()
    if "int4" in parts or "tinygemm" in parts:
        model = build_int4(args.desc_act)
        if cuda:
            result["checks"] = check_layers(model)
            result["model_check"] = check_model(model, ARGS.vocab_size)
            free()
            result["int4_weights_gb"] = gib_allocated()
        if "int4" in parts:
            result["int4"] = profile_model(model, tok, only)
            save()
        if "tinygemm" in parts and cuda:
            for layer in model.modules():
                if isinstance(layer, gptq.GPTQLinear):
                    layer.repack_for_int4mm()
            free()
            result["int4_tinygemm"] = profile_model(model, tok, only=("generate/2048",))
            save()
        del model
        free()
    if "bf16" in result and "int4" in result:
        print_comparison(result["bf16"], result["int4"])


def free() -> None:
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
