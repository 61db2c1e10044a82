"""Same numbers however the work is batched, on a GPU in bf16 (a benchmark, not a test).

Random Qwen-7B-shaped weights (7.7B, bf16) serve real MMLU 5-shot and GSM8K 8-shot prompts
(GSM8K with fixed new tokens: random weights never stop) in several ways: the batch-invariant kernels
at the automatic batch size, at batch 16, 7 and 1, with the shared prefix reused or each prompt
served whole; and the library kernels (cuBLAS, flash attention), today's fastest path. Every way is
compared document by document with the invariant automatic run: a document differs when any choice
logit, parity probability or generated token differs by a bit.

    python -m bench.determinism --data-dir DATA --vocab qwen.tiktoken
    python -m bench.determinism --parts kernels      # tile and prefix bit checks, matmul speed

Data parallelism (1 vs 2 ranks) goes through the CLI: see bench/RESULTS.md for the commands.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from bench.bench_speed import timed
from bench.common import default_out, print_table, write_json
from eval.data import DataSource
from eval.tasks import gsm8k, mmlu
from model import ModelArgs, Qwen, QwenTokenizer, init_weights
from model import kernels
from model.engine import Engine

torch.set_grad_enabled(False)


def build_model(args: ModelArgs) -> Qwen:
    with torch.device("cuda"):
        model = Qwen(args).to(torch.bfloat16)
    return init_weights(model, std=0.02, seed=0).eval()


# (BLOCK_M, BLOCK_N, warps, stages): other tilings of the same K order, timed beside the chosen ones
CANDIDATE_TILES = [(64, 32, 4, 4), (64, 64, 4, 4), (64, 128, 4, 4), (128, 64, 4, 4), (128, 128, 8, 4),
                   (128, 256, 8, 4), (256, 128, 8, 3)]


# ---- kernels -----------------------------------------------------------------------------------------
def check_kernels(rows: list) -> None:
    """Bits across matmul tiles and across prefix sharing; matmul speed against cuBLAS."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n, k in ((12288, 4096), (4096, 4096), (11008, 4096), (4096, 11008), (151936, 4096)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        x = torch.randn(4096, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        outs = {tile: kernels.matmul(x, w, tile=tile) for tile in
                {kernels.matmul_tile(1), kernels.matmul_tile(100), kernels.matmul_tile(4096), *CANDIDATE_TILES}}
        first = next(iter(outs.values()))
        same = all(torch.equal(o, first) for o in outs.values())
        alone = all(torch.equal(kernels.matmul(x[i:i + m], w), first[i:i + m]) for i, m in ((0, 1), (5, 3), (64, 200)))
        for m in (1, 64, 256, 2048, 16384):
            xm = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            t_lib = _bench(lambda: torch.nn.functional.linear(xm, w))
            tiles = {str(t): round(_bench(lambda: kernels.matmul(xm, w, tile=t)) * 1e3, 3) for t in CANDIDATE_TILES
                     if m > 64 or t[0] == 64}
            t_tri = _bench(lambda: kernels.matmul(xm, w))
            rows.append({"part": "matmul", "n": n, "k": k, "m": m, "tiles_same_bits": same, "rows_alone_same_bits": alone,
                         "triton_ms": round(t_tri * 1e3, 3), "cublas_ms": round(t_lib * 1e3, 3),
                         "triton_tflops": round(2 * m * n * k / t_tri / 1e12, 1), "candidate_ms": tiles})
            print(rows[-1], flush=True)
    H, D, P = 32, 128, 900
    q = torch.randn(8, P + 200, H, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(8, H, P + 200, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    k[1:, :, :P], v[1:, :, :P] = k[0, :, :P], v[0, :, :P]
    pos = torch.arange(P + 200, device="cuda").expand(8, -1).clone()
    pos[3:, P + 50:] = -1
    full = kernels.attention(q, k, v, pos, pos, aligned=True)
    prefix = (k[0, :, :P].contiguous(), v[0, :, :P].contiguous())
    shared = kernels.attention(q[:, P:].contiguous(), k[:, :, P:], v[:, :, P:], pos[:, P:], pos[:, P:], prefix, aligned=True)
    alone = kernels.attention(q[2:3], k[2:3], v[2:3], pos[2:3], pos[2:3], aligned=True)
    real = pos[:, P:] >= 0
    rows.append({"part": "attention", "prefix_vs_full_same_bits": torch.equal(shared[real], full[:, P:][real]),
                 "row_alone_same_bits": torch.equal(alone, full[2:3])})
    print(rows[-1], flush=True)


def probe(rows: list) -> None:
    """The first module whose output for one row changes when the row is batched with others."""
    args = ModelArgs(n_layer=2)
    model = build_model(args)
    Engine(model, progress=False)  # selects the invariant kernels
    gen = torch.Generator(device="cuda").manual_seed(1)
    tokens = torch.randint(0, 150000, (5, 160), device="cuda", generator=gen)
    pos = torch.arange(160, device="cuda").expand(5, -1).clone()
    pos[0, 100:] = -1  # row 0: 100 tokens, padded; the others: 160
    outputs = {}

    def hook(name):
        def save(module, inputs, output):
            outputs.setdefault(name, []).append((inputs[0][0, :100].clone(), output[0, :100].clone()))
        return save

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n and not list(m.children())]
    alone_pos = pos[:1, :112].clone()
    model.hidden(tokens[:1, :112], positions=alone_pos)
    model.hidden(tokens, positions=pos)
    for h in handles:
        h.remove()
    for name, ((in_a, out_a), (in_b, out_b)) in outputs.items():
        rows.append({"part": "probe", "module": name, "input_same": torch.equal(in_a, in_b),
                     "output_same": torch.equal(out_a, out_b)})
        print(rows[-1], flush=True)


def _bench(fn, reps=20):
    fn()
    t, _ = timed(lambda: [fn() for _ in range(reps)])
    return t / reps


# ---- engine ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Way:
    name: str
    invariant: bool = True
    batch: int | None = None
    share_prefix: bool = True
    limit: int | None = None  # documents served (a subset for the slow ways)


def choice_records(model, reqs, way: Way):
    engine = Engine(model, progress=False, invariant=way.invariant, max_batch=way.batch, share_prefix=way.share_prefix)
    reqs = reqs[: way.limit]
    seconds, out = timed(lambda: engine.score_choices([r.tokens for r in reqs], [r.choice_ids for r in reqs],
                                                      [r.shared_prefix for r in reqs]))
    return seconds, [(o.logits, o.parity_probs, o.top_id) for o in out]


def generate_records(model, reqs, way: Way, new_tokens: int):
    engine = Engine(model, progress=False, invariant=way.invariant, max_batch=way.batch, share_prefix=way.share_prefix)
    reqs = reqs[: way.limit]
    seconds, out = timed(lambda: engine.generate([r.tokens for r in reqs], [new_tokens] * len(reqs), [()] * len(reqs),
                                                 shared_prefix=[r.shared_prefix for r in reqs]))
    return seconds, [o.tokens for o in out]


def compare_ways(name, ways, serve, rows):
    for kernels_invariant in (True, False):  # compile and autotune outside the timed runs
        serve(Way("warm-up", invariant=kernels_invariant, limit=64))
    reference_s, reference = serve(ways[0])
    rows.append({"part": name, "way": ways[0].name, "docs": len(reference), "differ": 0, "seconds": round(reference_s, 1)})
    print(rows[-1], flush=True)
    for way in ways[1:]:
        seconds, records = serve(way)
        differ = sum(a != b for a, b in zip(records, reference))
        rows.append({"part": name, "way": way.name, "docs": len(records), "differ": differ, "seconds": round(seconds, 1)})
        print(rows[-1], flush=True)


def ways(small: int, whole: int) -> list[Way]:
    """The full set for the automatic batch sizes (their times are the cost); subsets for the slow ways."""
    return [Way("invariant, auto batch"), Way("invariant, batch 16", batch=16, limit=small * 2),
            Way("invariant, batch 7", batch=7, limit=small), Way("invariant, batch 1", batch=1, limit=small // 8),
            Way("invariant, prompts whole (no prefix reuse)", share_prefix=False, limit=whole),
            Way("invariant, auto batch, again"), Way("library kernels, auto batch (fastest)", invariant=False),
            Way("library kernels, batch 7", invariant=False, batch=7, limit=small)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir")
    p.add_argument("--vocab")
    p.add_argument("--parts", default="kernels,mmlu,gsm8k")
    p.add_argument("--mmlu-limit", type=int, help="questions (default: all 14,042)")
    p.add_argument("--gsm8k-limit", type=int, help="problems (default: all 1,319)")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--smoke", action="store_true", help="a small model: checks the script")
    p.add_argument("--out", default=default_out("determinism.json"))
    args = p.parse_args()
    rows: list = []
    parts = args.parts.split(",")
    if "kernels" in parts:
        check_kernels(rows)
    if "probe" in parts:
        probe(rows)
    if "mmlu" in parts or "gsm8k" in parts:
        model = build_model(ModelArgs(dim=256, n_layer=2, n_head=2) if args.smoke else ModelArgs())
        tok, data = QwenTokenizer(args.vocab), DataSource(Path(args.data_dir))
    if "mmlu" in parts:
        reqs = [r for d in mmlu.TASK.load(data, "fewshot") for r in mmlu.TASK.requests(d, tok, "fewshot", {})]
        reqs = reqs[: args.mmlu_limit]
        compare_ways("mmlu", ways(1000, 1000), lambda w: choice_records(model, reqs, w), rows)
    if "gsm8k" in parts:
        reqs = [r for d in gsm8k.TASK.load(data, "fewshot") for r in gsm8k.TASK.requests(d, tok, "fewshot", {})]
        reqs = reqs[: args.gsm8k_limit]
        compare_ways("gsm8k", ways(56, 112), lambda w: generate_records(model, reqs, w, args.new_tokens), rows)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "rows": rows}
    write_json(args.out, result)
    print_table(("part", "way", "documents", "differ from invariant auto", "seconds"),
                [[r["part"], r["way"], r["docs"], r["differ"], r["seconds"]] for r in rows if r["part"] in ("mmlu", "gsm8k")])


if __name__ == "__main__":
    main()
