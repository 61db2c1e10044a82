"""GPU correctness check of the fast paths (not a benchmark): run first on a lent GPU.

A mid-size random Qwen in fp32 and bf16, with each op set (fast, invariant): fused shared-prefix attention
vs the plain reference path, CUDA-graphed decoding vs eager (the invariant decode step is captured too),
engine results vs full forwards, and for the invariant set the same requests served one row at a time and
with prompts whole. Prints one line per check.
"""
import argparse
import time

import torch

from model import ModelArgs, Qwen, init_weights, ops
from model.engine import Engine

torch.set_grad_enabled(False)


def build(dtype):
    args = ModelArgs(vocab_size=32000, dim=1024, n_layer=8, n_head=8, head_dim=128, intermediate_size=2816,
                     seq_length=512)
    with torch.device("cuda"):
        model = Qwen(args)
    return init_weights(model, std=0.02, seed=0).to(dtype).eval()


def prompts(n, lo, hi, prefix=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [list(prefix) + torch.randint(0, 32000, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def late_pin() -> None:
    """Products made before the invariant set was chosen (a library user's own code): do the pins still take
    hold for the products after? Rows of the MLP down projection alone and among 64 rows. (Freeing the
    earlier workspaces is no remedy: a CUDA graph captured before would replay into freed memory.)"""
    from model import kernels

    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(4096, 11008, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    x = torch.randn(64, 11008, device="cuda", dtype=torch.bfloat16, generator=gen)
    before = sum(not torch.equal(torch.nn.functional.linear(x[i:i + 1], w), torch.nn.functional.linear(x, w)[i:i + 1])
                 for i in range(64))
    ops.select("invariant", "cuda")
    after = sum(not torch.equal(kernels.linear(x[i:i + 1], w), kernels.linear(x, w)[i:i + 1]) for i in range(64))
    print(f"pins after earlier products: rows differing alone vs among 64: {before}/64 unpinned, {after}/64 pinned")


def fused_elementwise() -> None:
    """The invariant add+norm and rope_qkv in bf16 against the original's separate eager ops."""
    from model import kernels
    from model.ops import rms_norm, rope

    g = torch.Generator("cuda").manual_seed(0)
    x, delta = (torch.randn(64, 4096, device="cuda", generator=g).bfloat16() for _ in range(2))
    w = (torch.rand(4096, device="cuda", generator=g) + 0.5).bfloat16()
    total, normed = kernels.add_rms_norm(x, delta, w, 1e-6)
    print(f"bf16 add_rms_norm: sum differs from eager x + delta at {(total != x + delta).sum().item()} of "
          f"{x.numel()}, norm at {(normed != rms_norm(x + delta, w, 1e-6)).sum().item()}")
    q, k, _ = torch.randn(4, 33, 3, 32, 128, device="cuda", generator=g).bfloat16().unbind(2)
    angles = torch.rand(4, 33, 1, 128, device="cuda", generator=g) * 100
    cos, sin = angles.cos(), angles.sin()
    scale = (torch.rand(4, 33, 1, 1, device="cuda", generator=g) + 1).bfloat16()
    rq, rk = kernels.rope_qkv(q, k, k, cos, sin, scale)
    eq, ek = rope(q, cos, sin) * scale, rope(k, cos, sin)
    print(f"bf16 rope_qkv: q differs from eager at {(rq != eq).sum().item()} of {q.numel()}, "
          f"k at {(rk != ek).sum().item()} (fp32 contraction may move a last bit)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--op-sets", default="fast,invariant")
    p.add_argument("--late-pin", action="store_true", help="only: do the pins hold after unpinned products?")
    args = p.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    if args.late_pin:  # its own process: the products before the pins must be the process's first
        late_pin()
        return
    # as a run does: cuBLAS pinned before the process's first product, else the invariant set's library
    # products keep the split-K choices of the handles made before (and the fast rows run pinned too)
    ops.select("invariant", "cuda")
    fused_elementwise()
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    for dtype, op_set in [(d, ops.KERNELS[name]) for d in dtypes for name in args.op_sets.split(",")]:
        model = build(dtype)
        model.ops = op_set
        label = f"{dtype} {op_set.name}"
        shots = list(range(1000, 1600))
        ps = prompts(40, 20, 200, shots)
        engine = Engine(model, progress=False)
        t = time.time()
        fast = engine.score_choices(ps, [[1, 2, 3, 4]] * 40, shared_prefix=[600] * 40)
        torch.cuda.synchronize()
        model.ops = ops.REFERENCE
        slow = Engine(model, progress=False, max_batch=1).score_choices(ps, [[1, 2, 3, 4]] * 40)
        model.ops = op_set
        a = torch.tensor([r.logits for r in fast])
        b = torch.tensor([r.logits for r in slow])
        agree = sum(x.index(max(x)) == y.index(max(y)) for x, y in zip(a.tolist(), b.tolist()))
        print(f"{label}: choice fused-prefix vs math full-prompt: rel {rel(a, b):.2e}, argmax agree {agree}/40 "
              f"({time.time() - t:.1f}s)")
        gp = prompts(12, 5, 60, shots[:300], seed=1)
        eager = Engine(model, progress=False, cuda_graphs=False).generate(gp, [40] * 12, [()] * 12, shared_prefix=[300] * 12)
        graphed = Engine(model, progress=False).generate(gp, [40] * 12, [()] * 12, shared_prefix=[300] * 12)
        same = sum(x.tokens == y.tokens for x, y in zip(eager, graphed))
        print(f"{label}: generation CUDA graphs vs eager: identical {same}/12")
        model.ops = ops.REFERENCE
        plain = Engine(model, progress=False, cuda_graphs=False, max_batch=2).generate(gp, [40] * 12, [()] * 12)
        model.ops = op_set
        prefix_len = [sum(1 for _ in iter_common(x.tokens, y.tokens)) for x, y in zip(graphed, plain)]
        print(f"{label}: generation fast vs math path: identical {sum(p == 40 for p in prefix_len)}/12, "
              f"common prefix lengths {prefix_len}")
        if op_set is ops.INVARIANT:  # the same bits served another way; prompts whole: a prefix of one request
            for way, engine in (("batch 1", Engine(model, progress=False, max_batch=1)),
                                ("prompts whole", Engine(model, progress=False, share_prefix=False))):
                tokens = engine.generate(gp, [40] * 12, [()] * 12, shared_prefix=[300] * 12)
                choices = engine.score_choices(ps, [[1, 2, 3, 4]] * 40, shared_prefix=[600] * 40)
                print(f"{label}: {way} vs automatic batches, prefixes shared: generations identical "
                      f"{sum(x.tokens == y.tokens for x, y in zip(tokens, graphed))}/12, choice logits identical "
                      f"{sum(x.logits == y.logits for x, y in zip(choices, fast))}/40")
        seqs = prompts(4, 1000, 3000, seed=2)
        nll = Engine(model, progress=False).loglikelihood(seqs)
        x = torch.tensor(seqs[0], device="cuda")[None]
        ref = torch.nn.functional.cross_entropy(model(x)[0, :-1].float(), x[0, 1:], reduction="sum").item()
        print(f"{label}: loglikelihood engine vs full forward: {nll[0][0]:.3f} vs {ref:.3f}")
        del model, engine
        torch.cuda.empty_cache()


def iter_common(a, b):
    for x, y in zip(a, b):
        if x != y:
            return
        yield x


if __name__ == "__main__":
    main()
