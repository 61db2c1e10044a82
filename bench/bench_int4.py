"""Int4 (GPTQ) beside BF16 on one GPU: the README's speed and memory table, with random Qwen-7B-shaped weights.

    python bench/bench_int4.py --vocab ../shared/qwen/qwen.tiktoken --out int4_results.json [--desc-act]
    python bench/bench_int4.py --smoke    # a small model (on the CPU when there is no GPU): the script's flow only

Prints a markdown table and writes every number (checks, profile rows, the row sweep) to --out as JSON.

Published (spec 8.3; A100-SXM4-80G, PyTorch 2.0.1, AutoGPTQ, batch 1, from 1 context token):
BF16 30.34 / 29.32 tokens/s generating 2048 / 8192 tokens, peak 17.66 GB encoding 2048 / 22.58 GB generating
8192; Int4 43.56 / 33.92 tokens/s, 8.21 / 13.62 GB.

Speed does not depend on weight values, so no checkpoint is needed. BF16 is measured first, alone, and freed;
the Int4 model is then built straight into GPTQ form (random bf16 weights one projection at a time, rounded
to nearest, symmetric, group 128: the Qwen-7B-Chat-Int4 settings), so neither model sits in the other's
peak. Before any Int4 timing the fused kernel is checked against the dequantizing reference on the device:
each projection shape at 1 and 16 rows, then the whole model's logits and greedy tokens. Last, one projection
is timed fused vs bf16 over row counts: the fused kernel is built for few rows (decoding), not for prefill.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from eval.backends import NativeBackend, profile  # noqa: E402
from eval.tasks import profile as profile_task  # noqa: E402
from model import ModelArgs, Qwen, QwenTokenizer, init_weights  # noqa: E402
from model import gptq  # noqa: E402
from model.engine import Engine  # noqa: E402

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
MAX_LAYER_ERROR = 1e-2  # relative; the fused kernel rounds the fp16 scales to bf16 (2^-9)
MAX_LOGIT_ERROR = 5e-2  # relative, after 32 layers of such rounding


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
def profile_model(model: Qwen, tok: QwenTokenizer) -> dict:
    """The `profile` task's three measurements: tokens/s and peak GiB, each request served alone."""
    task = profile_task.TASK
    docs = task.load(None, "fewshot")
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


def check_fused(model: Qwen, vocab_size: int) -> dict:
    """Fused vs reference on this device, before any timing: per projection shape, logits, greedy tokens."""
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    block = model.transformer.h[0]
    layers = {name: block.get_submodule(name) for name in gptq.QUANTIZED}
    inputs = {name: [torch.randn(rows, layer.in_features, device=DEVICE, generator=gen, dtype=torch.bfloat16)
                     for rows in (1, 16)] for name, layer in layers.items()}
    reference = {name: [layers[name](x) for x in xs] for name, xs in inputs.items()}
    prompt = torch.randint(0, vocab_size, (1, 64), device=DEVICE, generator=gen)
    ref_logits = model(prompt)
    ref_tokens = Engine(model, progress=False, cuda_graphs=False).generate([prompt[0].tolist()], [32], [[]])[0].tokens
    repacked = gptq.use_int4mm(model)
    checks = {"layers_repacked": f"{repacked}/{len(gptq.QUANTIZED) * ARGS.n_layer}"}
    if repacked == 0 and DEVICE.type == "cuda":
        raise SystemExit("no layer fits the fused int4 kernel here (it needs an sm80+ GPU): nothing to compare")
    if repacked == 0:  # the smoke run on a CPU: the reference path only
        return checks
    for name, xs in inputs.items():
        errors = [relative_error(layers[name](x), ref) for x, ref in zip(xs, reference[name])]
        checks[f"{name} relative error (1, 16 rows)"] = [f"{e:.2e}" for e in errors]
        if max(errors) > MAX_LAYER_ERROR:
            raise SystemExit(f"fused int4 kernel disagrees with the reference on {name}: {errors}")
    logits = model(prompt)
    checks["logits relative error"] = f"{relative_error(logits, ref_logits):.2e}"
    checks["argmax agreement over 64 positions"] = int((logits.argmax(-1) == ref_logits.argmax(-1)).sum())
    tokens = Engine(model, progress=False).generate([prompt[0].tolist()], [32], [[]])[0].tokens
    checks["greedy tokens equal to the reference (of 32)"] = sum(a == b for a, b in zip(tokens, ref_tokens))
    print(checks, flush=True)
    if relative_error(logits, ref_logits) > MAX_LOGIT_ERROR:
        raise SystemExit(f"fused int4 model disagrees with the reference: {checks}")
    return checks


def time_ms(fn, repeats: int = 50) -> float:
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats * 1e3


def row_sweep(desc_act: bool) -> list[dict]:
    """One 4096 -> 11008 projection (mlp.w1): fused int4 vs bf16 F.linear over row counts."""
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    weight = torch.empty(11008, 4096, dtype=torch.bfloat16, device=DEVICE).normal_(0, 0.02, generator=gen)
    layer = gptq.GPTQLinear(4096, 11008, bias=False, group_size=GROUP_SIZE, desc_act=desc_act).to(DEVICE)
    for attr, tensor in quantize_symmetric(weight, desc_act, gen).items():
        setattr(layer, attr, tensor)
    layer.repack_for_int4mm()
    rows = []
    for m in (1, 4, 16, 64, 256, 1024, 4096):
        x = torch.randn(m, 4096, dtype=torch.bfloat16, device=DEVICE, generator=gen)
        rows.append({"rows": m, "bf16_ms": round(time_ms(lambda: F.linear(x, weight)), 4),
                     "int4_ms": round(time_ms(lambda: layer(x)), 4)})
        print(rows[-1], flush=True)
    return rows


def print_table(bf16: dict, int4: dict) -> None:
    print("\n| measurement | BF16 tok/s | BF16 peak GB | Int4 tok/s | Int4 peak GB | published BF16 tok/s / GB "
          "| published Int4 tok/s / GB |")
    print("|---|---|---|---|---|---|---|")
    for key, (pub_bf16, pub_int4) in PUBLISHED.items():
        cells = [bf16[key]["tokens_per_s"], bf16[key]["peak_gb"], int4[key]["tokens_per_s"], int4[key]["peak_gb"]]
        published = [" / ".join("-" if v is None else str(v) for v in pub) for pub in (pub_bf16, pub_int4)]
        print(f"| {key} | " + " | ".join(str(c) for c in cells) + f" | {published[0]} | {published[1]} |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--vocab", default=str(REPO.parent / "shared" / "qwen" / "qwen.tiktoken"))
    p.add_argument("--out", default="int4_results.json")
    p.add_argument("--desc-act", action="store_true", help="act-order groups (the fused path then permutes inputs)")
    p.add_argument("--smoke", action="store_true", help="a small model: checks the script, measures nothing")
    args = p.parse_args()
    tok = QwenTokenizer(args.vocab)
    result = {"device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "desc_act": args.desc_act, "group_size": GROUP_SIZE}

    model = build_bf16()
    result["bf16_weights_gb"] = gib_allocated()
    result["bf16"] = profile_model(model, tok)
    del model
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()

    model = build_int4(args.desc_act)
    result["checks"] = check_fused(model, ARGS.vocab_size)
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
        result["int4_weights_gb"] = gib_allocated()
    result["int4"] = profile_model(model, tok)
    del model
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
        result["row_sweep_mlp_w1"] = row_sweep(args.desc_act)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print_table(result["bf16"], result["int4"])


if __name__ == "__main__":
    main()
