"""Decode-step time of the own-cache attention variants (a diagnostic): 7.7B random weights, GSM8K-like
batch of 144 rows reading 600 cache slots, shared 900-token prefix, CUDA graphs."""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model.qwen as qwen  # noqa: E402
from bench_speed import build_model  # noqa: E402
from model.engine import Engine  # noqa: E402

torch.set_grad_enabled(False)


def bmm_lse(q, k, v, mask):
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = scores.logsumexp(-1)
    return (scores - lse[..., None]).exp().to(v.dtype) @ v, lse


def main():
    model = build_model()
    prompts = [list(range(1000, 1900)) + list(range(i, i + 100)) for i in range(144)]
    fused = qwen.attend_cache
    for name, fn in (("bmm", bmm_lse), ("compiled multiply-reduce", fused)):
        qwen.attend_cache = fn
        engine = Engine(model, progress=False, sync_every=16)
        engine.generate(prompts[:4], [40] * 4, [()] * 4, shared_prefix=[900] * 4)  # warm up / compile
        engine.stats.clear()
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.generate(prompts, [128] * 144, [()] * 144, shared_prefix=[900] * 144)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        print(f"{name}: {seconds:.2f}s for 144 x 128, {1000 * seconds / engine.stats['decode_steps']:.1f} ms/step "
              f"incl. prefill, {dict(engine.stats)}", flush=True)


if __name__ == "__main__":
    main()
