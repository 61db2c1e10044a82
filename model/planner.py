"""How a list of requests becomes forwards: prefix groups, padded widths, batches and decode rows, sized
to a memory budget derived from free device memory (no trial and error, no out-of-memory retries).

What a row computes never depends on its neighbours: on a CPU because a batch only mixes rows of one
padded width (`Planner.batches`); on a GPU because the batch-invariant op set (model/ops.py) computes
every row alone, and the few reductions left to the engine are done per row on the host.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .qwen import Qwen, ntk_alpha

MEMORY_FRACTION = 0.85  # of free device memory, for activations and KV cache
CPU_BATCH_TOKENS = 8192  # a CPU batch's tokens (no memory query there)
GPU_BATCH_TOKENS = 16384  # past ~16k tokens per forward the GEMMs gain nothing
PAD_MULTIPLE = 16  # padded widths are multiples of this: few distinct shapes


def activation_bytes(tokens: int, dim: int, intermediate_size: int, itemsize: int) -> int:
    """Peak activation bytes of `tokens` tokens in one forward without a cache (a generous estimate), shared
    with the hf backend: one layer lives at a time: the residual and normed hidden, q/k/v with their RoPE'd
    copies and the attention output (8 x dim), the MLP's gate, up and product (3 x intermediate) in the
    model dtype, and RMSNorm's fp32 input and square (2 x dim x 4 bytes). Attention scores are not counted
    (fused kernels keep no [T, T] scores)."""
    return tokens * ((8 * dim + 3 * intermediate_size) * itemsize + 8 * dim)


@dataclass
class Group:
    """Requests that share one prefix K/V: the same shared tokens and the same per-layer NTK alphas."""

    prefix: tuple[int, ...]
    members: list[int]
    ntk_len: int  # a member's length: every member gives the same per-layer NTK alphas


class Planner:
    def __init__(self, model: Qwen, max_batch: int | None, share_prefix: bool):
        self.model, self.args = model, model.args
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_batch = max_batch
        self.share_prefix = share_prefix
        self.budget: int | None = None  # bytes for activations and KV, measured once per request list
        self.tensor_parallel = getattr(model, "tensor_parallel", None)  # a group whose ranks cut the same batches

    # ---- memory -----------------------------------------------------------------------------------
    def measure_budget(self) -> None:
        """Bytes for activations and KV cache, measured once per request list (a query per batch cost
        seconds); None on a CPU, where a token budget applies instead."""
        if self.device.type != "cuda":
            self.budget = None
            return
        free, _ = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        self.budget = int((free + cached) * MEMORY_FRACTION)  # blocks PyTorch holds unused are free too
        if self.tensor_parallel is not None:  # every rank of a tensor-parallel group must cut the same batches
            self.budget = self.tensor_parallel.smallest(self.budget)

    def kv_bytes_per_token(self) -> int:
        a = self.args
        return 2 * a.n_layer * a.n_head * a.head_dim * self.dtype.itemsize

    def forward_bytes(self, batch: int, length: int, prefix: int) -> int:
        """Peak activation bytes of one forward of `batch` rows of `length` tokens after `prefix` shared ones."""
        a = self.args
        scores = 0
        if a.windows:  # windows take the explicit-scores path: scores and probabilities in fp32
            scores = 3 * 4 * a.n_head * length * (length + prefix)
        return batch * (activation_bytes(length, a.dim, a.intermediate_size, self.dtype.itemsize) + scores)

    def fits(self, batch: int, length: int, prefix: int, per_row: int = 0) -> bool:
        if batch == 1:
            return True
        if self.max_batch is not None and batch > self.max_batch:
            return False
        if self.budget is None:
            return batch * length <= CPU_BATCH_TOKENS
        fits = self.forward_bytes(batch, length, prefix) + batch * per_row <= self.budget
        return batch * length <= GPU_BATCH_TOKENS and fits

    def decode_rows(self, waiting: int, max_len: int, longest: int, prefix: int) -> int:
        """Rows of a static decode cache of `max_len` slots: as many as the budget holds beside the
        prefill of the `longest` prompt, at most `waiting`."""
        n = waiting if self.max_batch is None else min(waiting, self.max_batch)
        if self.budget is None:
            rows = min(n, CPU_BATCH_TOKENS // max(1, max_len))
        else:
            per_row = max_len * self.kv_bytes_per_token()
            rows = min(n, (self.budget - self.forward_bytes(1, longest, prefix)) // per_row)
        return max(2 if self.device.type == "cpu" else 1, rows)  # CPU: two rows at least, see decoder.head

    # ---- shapes -----------------------------------------------------------------------------------
    def width(self, length: int) -> int:
        """Padded width of a row: a function of its own length only (see `batches`)."""
        return max(2, -(-length // PAD_MULTIPLE) * PAD_MULTIPLE)

    def pad(self, seqs: list[Sequence[int]], start: int) -> tuple[Tensor, Tensor, Tensor]:
        """Right-padded tokens, positions from `start` (-1 on padding), and lengths (see `width`)."""
        width = max(self.width(len(s)) for s in seqs)
        tokens = torch.zeros(len(seqs), width, dtype=torch.long)
        positions = torch.full((len(seqs), width), -1, dtype=torch.long)
        for row, seq in enumerate(seqs):
            tokens[row, : len(seq)] = torch.tensor(seq)
            positions[row, : len(seq)] = torch.arange(start, start + len(seq))
        lengths = torch.tensor([len(s) for s in seqs])
        return tokens.to(self.device), positions.to(self.device), lengths.to(self.device)

    def batches(self, order: list[int], lengths, prefix: int, per_row: int = 0):
        """Consecutive slices of `order` (sorted longest first) that fit in memory.

        On a CPU a batch only takes rows of one padded width: what a row computes then never depends on
        which rows share its batch, and results are identical for every batch size. On a GPU the matrix
        kernels change with the batch shape anyway, so a batch takes shorter rows too, as long as padding
        stays under a quarter of its tokens: few, large forwards.
        """
        start = 0
        while start < len(order):
            width, end = self.width(lengths[order[start]]), start + 1
            total = lengths[order[start]]
            while end < len(order) and self.fits(end + 1 - start, width, prefix, per_row):
                length = lengths[order[end]]
                if self.device.type == "cpu" and self.width(length) != width:
                    break
                if self.device.type != "cpu" and 4 * (total + length) < 3 * width * (end + 1 - start):
                    break
                total += length
                end += 1
            yield order[start:end]
            start = end

    def groups(self, prompts: Sequence[Sequence[int]], shared: Sequence[int], ntk_lengths: Sequence[int]) -> list[Group]:
        """Group requests by (shared prefix, per-layer NTK alphas): a prefix's K/V depends on both."""
        a = self.args
        if not self.share_prefix:
            shared = [0] * len(prompts)
        lengths = torch.tensor(list(ntk_lengths), dtype=torch.long)
        windows = sorted({w for w in (a.windows or (None,))}, key=lambda w: w or 0)
        if a.use_dynamic_ntk:
            alphas = torch.stack([ntk_alpha(lengths if w is None else lengths.clamp(max=w), a.seq_length) for w in windows], 1)
        else:
            alphas = torch.ones(len(lengths), 1)
        groups: dict[tuple, Group] = {}
        for i, prompt in enumerate(prompts):
            prefix = tuple(prompt[: min(shared[i], len(prompt) - 1)])
            key = (prefix, tuple(alphas[i].tolist()) if prefix else ())
            groups.setdefault(key, Group(prefix, [], int(lengths[i]))).members.append(i)
        if self.model.ops.prefix_exact:
            # a prefix read by one request saves nothing held apart and costs a forward of its own: with the
            # same bits either way, such requests go whole, batched together (a quick check's 57 subjects:
            # a few forwards instead of 114)
            for key in [key for key, group in groups.items() if key[0] and len(group.members) == 1]:
                member = groups.pop(key).members[0]
                groups.setdefault(((), ()), Group((), [], int(lengths[member]))).members.append(member)
        return list(groups.values())
