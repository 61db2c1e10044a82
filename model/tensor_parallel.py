"""Tensor parallelism (Megatron style), applied from outside the model file (as gpt-fast does).

A tensor-parallel group of N processes holds one model; rank r of it keeps
- attention: heads [r H/N, (r+1) H/N): their q, k, v rows of c_attn (and bias), and the matching input
  columns of attn.c_proj, whose partial sums are reduced;
- MLP: rows [r I/N, (r+1) I/N) of w1 and w2, the matching input columns of mlp.c_proj (reduced);
- vocabulary: rows [r V/N, (r+1) V/N) of the embedding (a token outside them looks up zeros; the reduction
  adds the one rank that holds it) and of the LM head (logits gathered along the vocabulary);
- the norms whole.
`shard` cuts a built model (real or meta tensors); `load_tensor_parallel` builds it on the meta device, cuts
it, and reads from disk only this rank's slices (safetensors `get_slice`; a .bin is memory-mapped).

Reduction order. NCCL's all-reduce picks ring or tree, and its chunking, by message size, so a sum could
change with the batch shape. Here every rank gathers all partial sums and adds them in rank order, in fp32:
((p0 + p1) + p2) + ..., one order for any message size, the same bits on every rank. Results therefore
depend on the TP size (it is part of a run's identity), never on batching at a fixed size.

GPTQ checkpoints are not split (they fit one GPU; see EVALUATION.md, "Tensor parallel").
Processes: `init_groups` cuts the torchrun world into TP groups of consecutive ranks (one node) and DP
groups of equal TP rank; `lead` / `follow` let TP rank 0 run the evaluation while ranks 1.. repeat its
batched calls (lists of requests, broadcast) so every rank runs the same forwards.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import gptq
from .config import read_config, with_switches
from .loading import (
    ModelLoadError,
    resolve_checkpoint,
    resolve_device,
    resolve_dtype,
    weight_files,
)
from .qwen import Linear, Qwen

NOT_STORED = ("rotary_emb.inv_freq", ".attn.masked_bias", ".attn.bias", "logn_tensor")  # buffers, no weights


@dataclass(frozen=True)
class Group:
    """This process's place in its tensor-parallel group; `group` carries tensors, `objects` Python objects."""

    rank: int
    size: int
    group: object = None  # a ProcessGroup (NCCL on GPUs, gloo on CPUs)
    objects: object = None  # a gloo ProcessGroup of the same ranks
    first: int = 0  # the global rank of the group's rank 0

    def gather(self, x: Tensor) -> list[Tensor]:
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return parts

    def reduce(self, x: Tensor) -> Tensor:
        """Sum of every rank's x, added in rank order in fp32 (see the module docstring)."""
        parts = self.gather(x)
        total = parts[0].float()
        for part in parts[1:]:
            total = total + part.float()
        return total.to(x.dtype)

    def smallest(self, value: int | None) -> int | None:
        """The least of the ranks' values (memory budgets: every rank must batch alike)."""
        values = [None] * self.size
        dist.all_gather_object(values, value, group=self.objects)
        return None if None in values else min(values)

    def share(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, group=self.objects, group_src=0)
        return box[0]


@dataclass(frozen=True)
class Layout:
    """How the torchrun world splits: this process's TP group, and its data-parallel place."""

    tp: Group
    dp_rank: int
    dp_size: int
    dp_group: object  # gloo ProcessGroup of the processes with this TP rank


def init_groups(tp_size: int, cuda: bool) -> Layout:
    """TP groups of consecutive global ranks, DP groups of equal TP rank; every rank creates every group."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % tp_size:
        raise ValueError(f"--tensor-parallel {tp_size} does not divide the {world} processes")
    mine = {}
    for first in range(0, world, tp_size):
        ranks = list(range(first, first + tp_size))
        tensors = dist.new_group(ranks, backend="nccl" if cuda else "gloo")
        objects = dist.new_group(ranks, backend="gloo") if cuda else tensors
        if rank in ranks:
            mine["tp"] = Group(rank - first, tp_size, tensors, objects, first)
    for tp_rank in range(tp_size):
        ranks = list(range(tp_rank, world, tp_size))
        group = dist.new_group(ranks, backend="gloo")
        if rank in ranks:
            mine["dp"] = group
    return Layout(mine["tp"], rank // tp_size, world // tp_size, mine["dp"])


# ---- which slice of each tensor a rank keeps -------------------------------------------------------------
def slices(name: str, shape: tuple, g: Group, head_dim: int) -> tuple[int, list[tuple[int, int]]] | None:
    """(dim, [(start, stop), ...]) of tensor `name` (full shape) kept by rank g.rank; None: kept whole."""
    def part(n: int, unit: int = 1) -> tuple[int, int]:  # this rank's share of n, in whole units
        step = n // g.size
        if step * g.size != n or step % unit:
            raise ModelLoadError(f"{name}: size {n} does not split over {g.size} ranks")
        return g.rank * step, (g.rank + 1) * step

    if name.endswith(("wte.weight", "lm_head.weight", "mlp.w1.weight", "mlp.w2.weight")):
        return 0, [part(shape[0])]
    if name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):
        return 1, [part(shape[1], head_dim if "attn" in name else 1)]
    if name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
        dim = shape[0] // 3  # q, k, v stacked: the same heads of each
        start, stop = part(dim, head_dim)
        return 0, [(start + i * dim, stop + i * dim) for i in range(3)]
    return None


def cut(tensor: Tensor, spec) -> Tensor:
    if spec is None:
        return tensor
    dim, ranges = spec
    return torch.cat([tensor.narrow(dim, a, b - a) for a, b in ranges], dim)


# ---- the model, cut --------------------------------------------------------------------------------------
class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, start + n) of the embedding; other ids look up zeros, and the reduction adds the one
    rank that holds each id (exact: every other term is zero)."""

    def __init__(self, weight: Tensor, start: int, g: Group):
        super().__init__(*weight.shape, _weight=weight, _freeze=True)
        self.start, self.g = start, g

    def forward(self, ids: Tensor) -> Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight)
        return self.g.reduce(out.masked_fill(outside[..., None], 0))


class VocabParallelHead(Linear):
    """Rows [start, start + n) of the LM head; each rank's logits are gathered along the vocabulary."""

    def __init__(self, weight: Tensor, start: int, g: Group):
        super().__init__(weight.shape[1], weight.shape[0], bias=False, device="meta")
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start, self.g = start, g

    def forward(self, x: Tensor, ops) -> Tensor:
        return torch.cat(self.g.gather(super().forward(x, ops)), dim=-1)

    def rows(self, ids: Tensor) -> Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.out_features)
        rows = self.weight[local.clamp(0, self.out_features - 1)]
        return self.g.reduce(rows.masked_fill(outside[..., None], 0))


def _reduce_output(g: Group):
    def hook(module, inputs, output):  # a row-parallel product: this rank's partial sum
        return g.reduce(output)
    return hook


def shard(model: Qwen, g: Group) -> Qwen:
    """Cut a built model in place to rank g.rank's share; model.args then counts this rank's heads and MLP
    width (the KV cache and memory estimates size from them), model.tensor_parallel names the group."""
    args = model.args
    for n in (args.n_head, args.intermediate_size, args.vocab_size):
        if n % g.size:
            raise ModelLoadError(f"--tensor-parallel {g.size}: the model's sizes (heads {args.n_head}, MLP "
                                 f"{args.intermediate_size}, vocabulary {args.vocab_size}) do not all split evenly")
    with torch.no_grad():
        for name, param in list(model.named_parameters()):
            spec = slices(name, tuple(param.shape), g, args.head_dim)
            if spec is not None:
                module_name, _, attr = name.rpartition(".")
                setattr(model.get_submodule(module_name), attr, nn.Parameter(cut(param, spec), requires_grad=False))
    for block in model.transformer.h:
        block.attn.n_head = args.n_head // g.size
        block.attn.c_proj.register_forward_hook(_reduce_output(g))
        block.mlp.c_proj.register_forward_hook(_reduce_output(g))
    rows = args.vocab_size // g.size
    model.transformer.wte = VocabParallelEmbedding(model.transformer.wte.weight, g.rank * rows, g)
    model.lm_head = VocabParallelHead(model.lm_head.weight, g.rank * rows, g)
    model.args = replace(args, n_head=args.n_head // g.size, intermediate_size=args.intermediate_size // g.size)
    model.tensor_parallel = g
    return model


# ---- loading this rank's slices from disk -----------------------------------------------------------------
def load_tensor_parallel(path_or_id, g: Group, *, dtype="auto", device="auto", dynamic_ntk=None, logn=None,
                         window_attn=None) -> Qwen:
    """As loading.load_model, but reading only rank g.rank's slice of every tensor."""
    ckpt = resolve_checkpoint(str(path_or_id))
    if gptq.read_quantize_config(ckpt) is not None:
        raise ModelLoadError(f"{ckpt}: a GPTQ checkpoint is not split by --tensor-parallel (it fits one GPU: "
                             f"run it with --tensor-parallel 1, data parallel over the GPUs)")
    args = with_switches(read_config(ckpt / "config.json"), dynamic_ntk, logn, window_attn)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    with torch.device("meta"):
        model = Qwen(args)
    full = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    shard(model, g)
    digest = hashlib.blake2b((ckpt / "config.json").read_bytes(), digest_size=16)
    found = set()
    for file in weight_files(ckpt):
        for name, tensor in _read_slices(file, full, g, args.head_dim):
            found.add(name)
            digest.update(f"{name} {tuple(tensor.shape)}\n".encode())
            digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy())
            module_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module_name), attr,
                    nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))
    missing = sorted(set(full) - found)
    if missing:
        raise ModelLoadError(f"{ckpt}: missing tensor(s) {', '.join(missing[:3])}")
    model.checkpoint = str(ckpt)
    # every rank hashed its own slices: the model is all of them, at this TP size
    parts = [None] * g.size
    dist.all_gather_object(parts, digest.hexdigest(), group=g.objects)
    model.weights_fingerprint = hashlib.blake2b(json.dumps([g.size, parts]).encode(), digest_size=16).hexdigest()
    return model.eval().requires_grad_(False)


def _read_slices(file, full: dict, g: Group, head_dim: int):
    """(name, this rank's slice) for every weight in one file, its full shape checked first."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                if not name.endswith(NOT_STORED):
                    whole = f.get_slice(name)
                    spec = _checked(file, name, tuple(whole.get_shape()), full, g, head_dim)
                    yield name, _slice_read(whole, spec)
    else:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        for name, tensor in state.items():
            if not name.endswith(NOT_STORED):
                yield name, cut(tensor, _checked(file, name, tuple(tensor.shape), full, g, head_dim)).clone()


def _checked(file, name: str, shape: tuple, full: dict, g: Group, head_dim: int):
    if name not in full:
        raise ModelLoadError(f"{file}: unexpected tensor {name!r} (not a Qwen parameter)")
    if shape != full[name]:
        raise ModelLoadError(f"{file}: tensor {name!r} has shape {list(shape)}, config says {list(full[name])}")
    return slices(name, shape, g, head_dim)


def _slice_read(whole, spec) -> Tensor:
    """Only the bytes of this rank's rows or columns are read from the file."""
    if spec is None:
        return whole[:]
    dim, ranges = spec
    return torch.cat([whole[a:b] if dim == 0 else whole[:, a:b] for a, b in ranges], dim)


# ---- one rank evaluates, the others repeat its calls ------------------------------------------------------
SERVED = ("choice", "generate", "loglikelihood")  # a backend's batched methods: lists of requests in, lists out


def lead(backend, g: Group):
    """TP rank 0: each batched call is first sent to ranks 1.. (which run `follow`), then served here."""
    for name in SERVED:
        setattr(backend, name, _announced(name, getattr(backend, name), g))
    return backend


def _announced(name: str, serve, g: Group):
    def call(requests, on_done=None):
        g.share((name, requests))
        return serve(requests, on_done=on_done)
    return call


def follow(backend, g: Group) -> None:
    """TP ranks 1..: serve what rank 0 serves, in the same order (results are rank 0's to keep), until `release`."""
    while (message := g.share(None)) is not None:
        name, requests = message
        getattr(backend, name)(requests)


def release(g: Group) -> None:
    g.share(None)
