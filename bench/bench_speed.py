"""Native engine vs plain `transformers` on one GPU with random Qwen-7B-shaped weights (7.7B, bf16).

Speed does not depend on weight values, so no checkpoint is needed. Both paths share the same
weight tensors. Real benchmark data gives the real prompt lengths.

    python -m bench.bench_speed --data-dir DIR --vocab qwen.tiktoken --parts mmlu,gsm8k

Parts: mmlu (full 5-shot, 14,042 questions), gsm8k (1,319 prompts x 512 and x 256 fixed new tokens),
humaneval (164 x 512), long_ppl (16,384-token samples), profile (the README speed/memory table),
flips (predictions that change with the batch size, and fast vs simple path, bf16).
The transformers baseline runs at batch 1 on a subset and is extrapolated (each row says so).
Roofline: FLOPs over the measured matrix rate and bytes over the measured copy bandwidth.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from bench.common import default_out, print_table, write_json
from eval.api import LoglikelihoodRequest
from eval.backends import HFBackend, NativeBackend, profile
from eval.data import DataSource
from eval.tasks import gsm8k, humaneval, mmlu
from eval.tasks import profile as profile_task
from model import ModelArgs, Qwen, QwenTokenizer, init_weights

torch.set_grad_enabled(False)
SMOKE = "--smoke" in sys.argv  # a small model on a few requests: checks the script before the real run
ARGS = ModelArgs(dim=256, n_layer=2, n_head=2) if SMOKE else ModelArgs()  # Qwen-7B (original), seq_length 2048
LAYER_PARAMS = 4 * ARGS.dim**2 + 3 * ARGS.dim + 3 * ARGS.dim * ARGS.intermediate_size + 2 * ARGS.dim  # 202,395,648
HEAD_PARAMS = ARGS.vocab_size * ARGS.dim
WEIGHT_BYTES = 2 * (ARGS.n_layer * LAYER_PARAMS + 2 * HEAD_PARAMS)
KV_BYTES_PER_TOKEN = 2 * ARGS.n_layer * ARGS.dim * 2


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def ceilings() -> tuple[float, float]:
    """Measured bf16 matrix rate (FLOP/s) and device copy bandwidth (bytes/s, read + write)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    t, _ = timed(lambda: [a @ b for _ in range(20)])
    flops = 20 * 2 * 8192**3 / t
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    t, _ = timed(lambda: [y.copy_(x) for _ in range(10)])
    return flops, 10 * 2 * x.numel() / t


def build_model() -> Qwen:
    with torch.device("cuda"):
        model = Qwen(ARGS).to(torch.bfloat16)
    return init_weights(model, std=0.02, seed=0).eval()


def forward_flops(tokens: int, context: float) -> float:
    """Matrix FLOPs of a forward over `tokens` new tokens attending to `context` keys on average."""
    return tokens * (2 * ARGS.n_layer * LAYER_PARAMS + 4 * ARGS.n_layer * ARGS.dim * context)


def roofline(flops: float, bytes_: float, seconds: float, peak) -> float:
    return max(flops / peak[0], bytes_ / peak[1]) / seconds


class Bench:
    def __init__(self, args):
        self.args = args
        self.peak = ceilings()
        print(f"{torch.cuda.get_device_name()}: {self.peak[0] / 1e12:.0f} TFLOP/s bf16, {self.peak[1] / 1e12:.2f} TB/s copy")
        self.model = build_model()
        self.tok = QwenTokenizer(args.vocab)
        self.data = DataSource(Path(args.data_dir))
        self.native = NativeBackend(self.model, self.tok, progress=False)
        self.hf = HFBackend.from_native(self.model, self.tok, batch_size=1, progress=False)
        torch.cuda.empty_cache()  # the baseline's construction-time weights were replaced by shared ones
        self.rows, self.notes = [], {}

    def row(self, task, work, native_s, base_s, base_note, flops, bytes_):
        ratio = base_s / native_s if base_s else None
        self.rows.append({"task": task, "work": work, "native_s": round(native_s, 2),
                          "baseline_s": round(base_s, 1) if base_s else None, "baseline": base_note,
                          "ratio": round(ratio, 1) if ratio else None,
                          "roofline": round(roofline(flops, bytes_, native_s, self.peak), 3)})
        print(self.rows[-1], flush=True)

    def requests(self, task, mode="fewshot"):
        docs = task.load(self.data, mode)
        docs = docs[:: max(1, len(docs) // 40)] if SMOKE else docs
        return [r for doc in docs for r in task.requests(doc, self.tok, mode, {})]

    # ---- parts ----------------------------------------------------------------------------------
    def warmup(self):
        """Compile the fused elementwise kernels and warm the allocator outside every timed part."""
        reqs = self.requests(mmlu.TASK)
        self.native.choice(reqs[::20])
        self.native.generate([dataclasses.replace(r, stop=(), stop_ids=(), max_new_tokens=48)
                              for r in self.requests(gsm8k.TASK)[:64]])

    def mmlu(self):
        reqs = self.requests(mmlu.TASK)
        engine = self.native.engine
        engine.stats.clear()
        native_s, fast = timed(lambda: self.native.choice(reqs))
        computed = engine.stats["forward_tokens"]
        picked = list(range(0, len(reqs), max(1, len(reqs) // 100)))[:100]
        base_s, slow = timed(lambda: self.hf.choice([reqs[i] for i in picked]))
        agree = sum(_pred(fast[i]) == _pred(s) for i, s in zip(picked, slow))
        self.notes["mmlu_bf16_pred_agreement_native_vs_hf"] = f"{agree}/{len(picked)}"
        prompt_tokens = sum(len(r.tokens) for r in reqs)
        self.row("MMLU 5-shot (14,042 q)", f"{prompt_tokens / 1e6:.1f}M prompt tok, {computed / 1e6:.2f}M computed",
                 native_s, base_s * len(reqs) / len(picked), f"hf batch 1 on {len(picked)} q, extrapolated",
                 forward_flops(computed, 700) + len(reqs) * 2 * HEAD_PARAMS, engine.stats["forwards"] * WEIGHT_BYTES)
        self.mmlu_reqs, self.mmlu_fast = reqs, fast

    def flips(self):
        reqs, fast = self.mmlu_reqs[:3000], self.mmlu_fast[:3000]  # the first subjects, in file order
        small = NativeBackend(self.model, self.tok, batch_size=7, progress=False).choice(reqs)
        self.notes["mmlu_bf16_pred_flips_auto_vs_batch7"] = f"{sum(_pred(a) != _pred(b) for a, b in zip(fast, small))}/{len(reqs)}"
        plain = [dataclasses.replace(r, shared_prefix=0) for r in reqs[:1000]]
        simple = NativeBackend(self.model, self.tok, batch_size=1, progress=False).choice(plain)
        self.notes["mmlu_bf16_pred_flips_prefix_vs_full_prompt_batch1"] = \
            f"{sum(_pred(a) != _pred(b) for a, b in zip(fast, simple))}/{len(plain)}"
        print(self.notes, flush=True)

    def generation(self, name, task, new_tokens, mode="fewshot"):
        reqs = [dataclasses.replace(r, stop=(), stop_ids=(), max_new_tokens=new_tokens) for r in self.requests(task, mode)]
        engine = self.native.engine
        engine.stats.clear()
        native_s, out = timed(lambda: self.native.generate(reqs))
        assert all(len(o.tokens) == new_tokens for o in out)
        generated = len(reqs) * new_tokens
        base_n = 64
        base_s, _ = timed(lambda: self.hf.generate([dataclasses.replace(reqs[0], max_new_tokens=base_n)]))
        kv_read = engine.stats["decode_slots_read"] * KV_BYTES_PER_TOKEN
        flops = forward_flops(engine.stats["forward_tokens"] + generated, 600) + generated * 2 * HEAD_PARAMS
        self.row(f"{name} ({len(reqs)} x {new_tokens} new tok)", f"{generated / 1e6:.2f}M generated", native_s,
                 base_s / base_n * generated, f"hf batch 1, {base_n} tok of one prompt, extrapolated",
                 flops, engine.stats["decode_steps"] * WEIGHT_BYTES + kv_read)

    def gsm8k(self):
        self.generation("GSM8K 8-shot", gsm8k.TASK, 512)
        self.generation("GSM8K 8-shot", gsm8k.TASK, 256)

    def humaneval(self):
        self.generation("HumanEval", humaneval.TASK, 512)

    def long_ppl(self):
        papers = sorted((Path(self.args.data_dir) / "longctx_arxiv").rglob("*.txt"))
        reqs = []
        for path in papers:
            ids = self.tok.encode(path.read_text())
            if len(ids) >= 16384 and not (SMOKE and reqs):
                reqs.append(LoglikelihoodRequest(path.name, tuple(ids[:16384]), (("dynamic_ntk", True), ("logn", True))))
        native_s, _ = timed(lambda: self.native.loglikelihood(reqs))
        plain = [dataclasses.replace(reqs[0], switches=())]
        base_s, _ = timed(lambda: self.hf.loglikelihood(plain))
        self.row(f"long_ppl 16384 ({len(reqs)} samples)", f"{len(reqs) * 16384 / 1e6:.2f}M tokens", native_s,
                 base_s * len(reqs), "hf on 1 sample, extrapolated (no NTK/LogN in Qwen2)",
                 forward_flops(len(reqs) * 16384, 8192) + len(reqs) * 16384 * 2 * HEAD_PARAMS, len(reqs) * WEIGHT_BYTES)

    def profile(self):
        task = profile_task.TASK
        docs = task.load(None, "fewshot")[: 1 if SMOKE else None]
        reqs = [task.requests(d, self.tok, "fewshot", {})[0] for d in docs]
        results = profile(self.native, reqs)
        for doc, r in zip(docs, results):
            self.notes[f"profile {doc.doc_id}"] = {"tokens_per_s": round(r.tokens / r.seconds, 1),
                                                   "peak_gb": round(r.peak_memory_gb, 2), "seconds": round(r.seconds, 1)}
        base = profile(self.hf, [dataclasses.replace(reqs[0], max_new_tokens=128)])[0]
        self.notes["profile hf generate 128 from 1 token"] = {"tokens_per_s": round(base.tokens / base.seconds, 1),
                                                              "peak_gb": round(base.peak_memory_gb, 2)}
        gen = results[0]
        self.row("decode batch 1 (2048 from 1 token)", "2048 generated", gen.seconds, base.seconds / 128 * 2048,
                 "hf batch 1, 128 tok, extrapolated", forward_flops(2048, 1024) + 2048 * 2 * HEAD_PARAMS,
                 2048 * (WEIGHT_BYTES + 1024 * KV_BYTES_PER_TOKEN))
        print(self.notes, flush=True)


def _pred(response) -> int:
    return response.logits.index(max(response.logits))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", required=True)
    p.add_argument("--vocab", required=True)
    p.add_argument("--parts", default="mmlu,flips,gsm8k,humaneval,long_ppl,profile")
    p.add_argument("--out", default=default_out("bench_speed.json"))
    p.add_argument("--smoke", action="store_true", help="a small model on a few requests")
    args = p.parse_args()
    bench = Bench(args)
    for part in args.parts.split(","):
        getattr(bench, part)()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "ceilings": {"tflops": round(bench.peak[0] / 1e12), "tb_s": round(bench.peak[1] / 1e12, 2)},
              "rows": bench.rows, "notes": bench.notes}
    write_json(args.out, result)
    columns = ("task", "work", "native_s", "baseline_s", "ratio", "roofline", "baseline")
    print_table(columns, [[r[c] for c in columns] for r in bench.rows])


if __name__ == "__main__":
    main()
