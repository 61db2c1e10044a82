"""Batched inference over token ids: choice scores, greedy generation, rolling log-likelihood.

Where the speed comes from:
- requests are grouped by their shared prefix (the few-shot shots); the prefix K/V is computed once
  and every row of a batch attends to that one tensor (no per-row copy);
- rows are sorted by length and batched to a memory budget derived from free device memory;
- generation keeps a static KV cache, decodes all rows in one fixed-shape step (CUDA-graphed on a
  GPU), checks stop conditions on the host only every `sync_every` steps, and refills the rows of
  finished sequences with waiting ones (continuous batching);
- only the positions that are scored reach the LM head, in chunks for long sequences.
Results come back in input order and do not depend on how requests were batched: on a CPU because a
batch only mixes rows of one padded width; on a GPU with `invariant=True` (the default there) because
every product, norm and attention runs model/kernels.py, whose reductions have one order per row, and
the few reductions left to the engine (choice logits, summed NLL) are done per row on the host.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .config import ModelArgs, with_switches
from .qwen import KVCache, Qwen, ntk_alpha


@dataclass(frozen=True)
class ChoiceResult:
    logits: tuple[float, ...]  # fp32 logits of the choice tokens
    parity_probs: tuple[float, ...]  # softmax over the choices of the full-vocab softmax, in the model dtype
    top_id: int


@dataclass(frozen=True)
class Generation:
    tokens: tuple[int, ...]  # new tokens, the stop token excluded
    finish: str  # "stop" or "length"


Done = Callable[[list[tuple[int, object]]], None]  # called with (request index, result) pairs per batch


@dataclass
class _Group:
    prefix: tuple[int, ...]
    members: list[int]
    ntk_len: int  # a member's length: every member gives the same per-layer NTK alphas


class Engine:
    def __init__(self, model: Qwen, *, max_batch: int | None = None, memory_fraction: float = 0.85,
                 cpu_batch_tokens: int = 8192, sync_every: int = 16, progress: bool = True,
                 cuda_graphs: bool = True, loss_chunk: int = 1024, pad_multiple: int = 16,
                 gpu_batch_tokens: int = 16384, invariant: bool = True, share_prefix: bool = True):
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_batch = max_batch
        self.memory_fraction = memory_fraction
        self.cpu_batch_tokens = cpu_batch_tokens
        self.sync_every = sync_every
        self.progress = progress
        self.label = ""  # what is being served (the runner sets the task's name), first on every progress bar
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.loss_chunk = loss_chunk
        self.pad_multiple = pad_multiple
        self.gpu_batch_tokens = gpu_batch_tokens  # past ~16k tokens per forward the GEMMs gain nothing
        # batch-invariant kernels on a GPU (a CPU is invariant by construction, see _batches)
        self.invariant = invariant and self.device.type == "cuda"
        if self.device.type == "cuda":
            model.use_impl("invariant" if self.invariant else "sdpa")
        self.share_prefix = share_prefix
        self.budget: int | None = None  # bytes for activations and KV, measured once per request list
        self.stats = defaultdict(int)  # forwards, tokens, decode steps and slots read: for benchmarks
        self._head_rows: dict[int, np.ndarray] = {}  # fp32 LM-head rows of choice ids, on the host

    # ---- sizing -------------------------------------------------------------------------------
    def _measure_budget(self) -> None:
        """Bytes for activations and KV cache, measured once per request list (a query per batch cost
        seconds); None on a CPU, where a token budget applies instead."""
        if self.device.type != "cuda":
            self.budget = None
            return
        free, _ = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        self.budget = int((free + cached) * self.memory_fraction)  # blocks PyTorch holds unused are free too
        group = getattr(self.model, "tensor_parallel", None)
        if group is not None:  # every rank of a tensor-parallel group must cut the same batches
            self.budget = group.smallest(self.budget)

    def _kv_bytes_per_token(self) -> int:
        a = self.model.args
        return 2 * a.n_layer * a.n_head * a.head_dim * self.dtype.itemsize

    def _forward_bytes(self, batch: int, length: int, prefix: int) -> int:
        """Peak activation bytes of one forward without a cache (a generous estimate, no trial and error)."""
        a = self.model.args
        per_token = (6 * a.dim + 3 * a.intermediate_size) * self.dtype.itemsize + 4 * a.dim
        scores = 0
        if a.windows:  # windows take the explicit-scores path: scores and probabilities in fp32
            scores = 3 * 4 * a.n_head * length * (length + prefix)
        return batch * (length * per_token + scores)

    def _fits(self, batch: int, length: int, prefix: int, per_row: int = 0) -> bool:
        if batch == 1:
            return True
        if self.max_batch is not None and batch > self.max_batch:
            return False
        if self.budget is None:
            return batch * length <= self.cpu_batch_tokens
        fits = self._forward_bytes(batch, length, prefix) + batch * per_row <= self.budget
        return batch * length <= self.gpu_batch_tokens and fits

    def _width(self, length: int) -> int:
        """Padded width of a row: a function of its own length only (see `_batches`)."""
        return max(2, -(-length // self.pad_multiple) * self.pad_multiple)

    def _batches(self, order: list[int], lengths, prefix: int, per_row: int = 0):
        """Consecutive slices of `order` (sorted longest first) that fit in memory.

        On a CPU a batch only takes rows of one padded width: what a row computes then never depends on
        which rows share its batch, and results are identical for every batch size. On a GPU the matrix
        kernels change with the batch shape anyway, so a batch takes shorter rows too, as long as padding
        stays under a quarter of its tokens: few, large forwards.
        """
        start = 0
        while start < len(order):
            width, end = self._width(lengths[order[start]]), start + 1
            total = lengths[order[start]]
            while end < len(order) and self._fits(end + 1 - start, width, prefix, per_row):
                length = lengths[order[end]]
                if self.device.type == "cpu" and self._width(length) != width:
                    break
                if self.device.type != "cpu" and 4 * (total + length) < 3 * width * (end + 1 - start):
                    break
                total += length
                end += 1
            yield order[start:end]
            start = end

    def _groups(self, prompts: Sequence[Sequence[int]], shared: Sequence[int], ntk_lengths: Sequence[int]) -> list[_Group]:
        """Group requests by (shared prefix, per-layer NTK alphas): a prefix's K/V depends on both."""
        a = self.model.args
        if not self.share_prefix:
            shared = [0] * len(prompts)
        lengths = torch.tensor(list(ntk_lengths), dtype=torch.long)
        windows = sorted({w for w in (a.windows or (None,))}, key=lambda w: w or 0)
        if a.use_dynamic_ntk:
            alphas = torch.stack([ntk_alpha(lengths if w is None else lengths.clamp(max=w), a.seq_length) for w in windows], 1)
        else:
            alphas = torch.ones(len(lengths), 1)
        groups: dict[tuple, _Group] = {}
        for i, prompt in enumerate(prompts):
            prefix = tuple(prompt[: min(shared[i], len(prompt) - 1)])
            key = (prefix, tuple(alphas[i].tolist()) if prefix else ())
            groups.setdefault(key, _Group(prefix, [], int(lengths[i]))).members.append(i)
        return list(groups.values())

    def _prefix_cache(self, group: _Group) -> KVCache | None:
        if not group.prefix:
            return None
        n = len(group.prefix)
        cache = KVCache.empty(self.model.args, 1, n, self.dtype, self.device)
        positions = torch.arange(n, device=self.device)[None]
        tokens = torch.tensor(group.prefix, device=self.device)[None]
        rows = torch.zeros(1, dtype=torch.long, device=self.device)
        self.model.hidden(tokens, positions=positions, kv=cache.prefill(rows, positions, torch.tensor([group.ntk_len], device=self.device)))
        return cache

    def _pad(self, seqs: list[Sequence[int]], start: int) -> tuple[Tensor, Tensor, Tensor]:
        """Right-padded tokens, positions from `start` (-1 on padding), and lengths (see `_width`)."""
        width = max(self._width(len(s)) for s in seqs)
        tokens = torch.zeros(len(seqs), width, dtype=torch.long)
        positions = torch.full((len(seqs), width), -1, dtype=torch.long)
        for row, seq in enumerate(seqs):
            tokens[row, : len(seq)] = torch.tensor(seq)
            positions[row, : len(seq)] = torch.arange(start, start + len(seq))
        lengths = torch.tensor([len(s) for s in seqs])
        return tokens.to(self.device), positions.to(self.device), lengths.to(self.device)

    def _count(self, tokens: Tensor) -> None:
        self.stats["forwards"] += 1
        self.stats["forward_tokens"] += tokens.numel()

    def _head(self, rows: Tensor) -> Tensor:
        """LM head over [b, dim]. A one-row product would take BLAS's matrix-vector path, which sums in
        another order than the matrix-matrix path of larger batches; two rows keep results independent
        of the batch size."""
        if rows.shape[0] > 1:
            return self.model.lm_head(rows)
        return self.model.lm_head(rows.expand(2, -1))[:1]

    def _bar(self, total: int, desc: str, unit: str = "doc"):
        name = f"{self.label} {desc}" if self.label else desc
        return tqdm(total=total, desc=name, unit=unit, disable=not self.progress, dynamic_ncols=True, leave=False)

    # ---- 1. choice scores ---------------------------------------------------------------------
    @torch.inference_mode()
    def score_choices(self, prompts: Sequence[Sequence[int]], choice_ids: Sequence[Sequence[int]],
                      shared_prefix: Sequence[int] | None = None, on_done: Done | None = None) -> list[ChoiceResult]:
        shared = shared_prefix or [0] * len(prompts)
        results: list[ChoiceResult | None] = [None] * len(prompts)
        self._measure_budget()
        with self._bar(len(prompts), "choice") as bar:
            for group in self._groups(prompts, shared, [len(p) for p in prompts]):
                prefix = self._prefix_cache(group)
                n_prefix = len(group.prefix)
                suffixes = {i: prompts[i][n_prefix:] for i in group.members}
                lengths = {i: len(s) for i, s in suffixes.items()}
                order = sorted(group.members, key=lambda i: -lengths[i])
                for batch in self._batches(order, lengths, n_prefix):
                    _deliver(self._score_batch(batch, suffixes, choice_ids, prefix, n_prefix), results, on_done, bar)
        return results

    def _score_batch(self, batch, suffixes, choice_ids, prefix, n_prefix):
        tokens, positions, lengths = self._pad([suffixes[i] for i in batch], n_prefix)
        self._count(tokens)
        hidden = self.model.hidden(tokens, positions=positions, prefix=prefix)
        last = hidden[torch.arange(len(batch), device=self.device), lengths - 1]  # [b, dim]
        logits = self._head(last)  # model dtype, as the original
        probs = logits.softmax(-1)
        width = max(len(choice_ids[i]) for i in batch)
        ids = torch.tensor([list(choice_ids[i]) + [choice_ids[i][0]] * (width - len(choice_ids[i])) for i in batch],
                           device=self.device)  # [b, c]; short lists repeat their first id (dropped below)
        exact = self._choice_logits(last, ids)
        parity = probs.gather(1, ids).softmax(-1).float()
        top = logits.argmax(-1).tolist()
        parity = parity.tolist()
        return [(i, ChoiceResult(tuple(exact[row][: len(choice_ids[i])]), tuple(parity[row][: len(choice_ids[i])]), top[row]))
                for row, i in enumerate(batch)]

    def _choice_logits(self, last: Tensor, ids: Tensor) -> list[list[float]]:
        """fp32 logits of the choice tokens [b, c]. On a GPU a batched product would sum in an order that
        follows the batch shape; the host sums each row alone (numpy's pairwise order, fixed by the width)."""
        if self.device.type == "cpu":
            return torch.einsum("bd,bcd->bc", last.float(), self.model.lm_head.rows(ids).float()).tolist()
        missing = sorted(set(ids.flatten().tolist()) - self._head_rows.keys())
        if missing:
            rows = self.model.lm_head.rows(torch.tensor(missing, device=self.device)).float().cpu().numpy()
            self._head_rows.update(zip(missing, rows))
        hidden = last.float().cpu().numpy()
        rows = np.stack([[self._head_rows[i] for i in row] for row in ids.tolist()])  # [b, c, d]
        return (hidden[:, None, :] * rows).sum(-1).tolist()

    # ---- 2. rolling log-likelihood ------------------------------------------------------------
    @torch.inference_mode()
    def loglikelihood(self, sequences: Sequence[Sequence[int]], switches: Sequence[dict] | None = None,
                      on_done: Done | None = None) -> list[tuple[float, int]]:
        """Summed NLL of tokens[1:] given their prefixes, and the number of predicted tokens."""
        switches = switches or [{}] * len(sequences)
        results: list[tuple[float, int] | None] = [None] * len(sequences)
        by_switch = defaultdict(list)
        for i, sw in enumerate(switches):
            by_switch[tuple(sorted(sw.items()))].append(i)
        self._measure_budget()
        with self._bar(len(sequences), "loglikelihood") as bar:
            for key, members in by_switch.items():
                switches = with_switches(self.model.args, **dict(key))
                lengths = {i: len(sequences[i]) for i in members}
                order = sorted(members, key=lambda i: -lengths[i])
                # a loss chunk's fp32 logits and their log-softmax, per row
                chunk_bytes = 3 * 4 * self.loss_chunk * switches.vocab_size
                for batch in self._batches(order, lengths, 0, chunk_bytes):
                    _deliver(self._nll_batch(batch, sequences, switches), results, on_done, bar)
        return results

    def _nll_batch(self, batch, sequences, switches: ModelArgs):
        tokens, positions, lengths = self._pad([sequences[i] for i in batch], 0)
        self._count(tokens)
        hidden = self.model.hidden(tokens, positions=positions, switches=switches)
        losses: list[list[float]] = [[] for _ in batch]  # every position's loss, summed exactly at the end
        width = tokens.shape[1]
        for start in range(0, width - 1, self.loss_chunk):  # never all vocab logits of a long row at once
            stop = min(start + self.loss_chunk, width - 1)
            logits = self.model.lm_head(hidden[:, start:stop]).float()  # [b, chunk, vocab]
            targets = tokens[:, start + 1: stop + 1]
            # rows of the vocabulary stay contiguous: a class dimension in the middle runs many times slower
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
            loss = loss.view(targets.shape).masked_fill(positions[:, start + 1: stop + 1] < 0, 0.0)
            for row, values in enumerate(loss.tolist()):
                losses[row] += values
        # math.fsum rounds once: the sum does not depend on how positions were chunked or batched
        return [(i, (math.fsum(losses[row]), int(lengths[row]) - 1)) for row, i in enumerate(batch)]

    # ---- 3. greedy generation -----------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int], stop_ids: Sequence[Sequence[int]],
                 shared_prefix: Sequence[int] | None = None, stop_check: Callable[[int, list[int]], bool] | None = None,
                 on_done: Done | None = None, temperature: Sequence[float] | None = None,
                 seed: Sequence[int] | None = None) -> list[Generation]:
        """Greedy (temperature 0) or sampled continuations.

        stop_check(i, new_tokens) -> True once request i may stop (text rules); the returned tokens end at
        the shortest prefix for which it holds, whatever the batching. Sampling draws Gumbel noise from a
        hash of (seed, step, token id), so a request samples the same tokens in any batch.
        """
        shared = shared_prefix or [0] * len(prompts)
        sampling = (list(temperature or [0.0] * len(prompts)), list(seed or [0] * len(prompts)))
        results: list[Generation | None] = [None] * len(prompts)
        self._measure_budget()
        # counted in tokens of the budget (a request that stops early hands in the rest): the ETA moves
        # every sync, not only when a whole request ends
        with self._bar(sum(max_new_tokens), "generate", unit="tok") as bar:
            for group in self._groups(prompts, shared, [len(p) for p in prompts]):
                for done in _Decoder(self, group, prompts, max_new_tokens, stop_ids, stop_check, sampling, bar):
                    _deliver(done, results, on_done, None)
        return results


def _deliver(done: list, results: list, on_done: Done | None, bar) -> None:
    """Place a finished batch's (index, result) pairs and report them."""
    for i, r in done:
        results[i] = r
    if on_done:
        on_done(done)
    if bar is not None:
        bar.update(len(done))


def _bucket(n: int) -> int:
    """n rounded up to 128 * {1, 1.5, 2, 3, 4, 6, ...}: few distinct lengths, so few captured graphs."""
    size = 128
    while size < n:
        size = size * 3 // 2 if (size & (size - 1)) == 0 else size * 4 // 3
    return size


def gumbel_noise(seed: Tensor, step: Tensor, vocab: int) -> Tensor:
    """Gumbel(0, 1) noise [B, vocab] from a counter-based hash (murmur3's finaliser) of (seed, step, id):
    reproducible per request, with no generator state shared between rows."""
    mask = 0xFFFFFFFF
    x = (seed[:, None] * 0x9E3779B1 + step[:, None] * 0x85EBCA77
         + torch.arange(vocab, device=seed.device)[None, :]) & mask
    for shift, multiplier in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        x = ((x ^ (x >> shift)) * multiplier) & mask
    x = x ^ (x >> 16)
    uniform = (x.double() + 0.5) / 2.0**32
    return -torch.log(-torch.log(uniform)).float()


class _Decoder:
    """Continuous batching of one prefix group over a static KV cache."""

    def __init__(self, engine: Engine, group: _Group, prompts, max_new, stop_ids, stop_check, sampling, bar):
        self.e, self.model, self.bar = engine, engine.model, bar
        self.temperatures, self.seeds = sampling
        self.sampling = any(self.temperatures[i] > 0 for i in group.members)
        self.prefix = engine._prefix_cache(group)
        self.n_prefix = len(group.prefix)
        self.suffix = {i: prompts[i][self.n_prefix:] for i in group.members}
        self.max_new, self.stop_ids, self.stop_check = max_new, stop_ids, stop_check
        self.queue = sorted(group.members, key=lambda i: -len(self.suffix[i]))  # longest first
        self.max_len = max(engine._width(len(s)) for s in self.suffix.values()) + max(max_new[i] for i in group.members)
        self.rows = self._rows()
        dev = engine.device
        self.cache = KVCache.empty(self.model.args, self.rows, self.max_len, engine.dtype, dev)
        self.owner = [-1] * self.rows  # request index per row
        self.tokens_out = torch.zeros(self.rows, max(max_new[i] for i in group.members), dtype=torch.long, device=dev)
        self.n_new = torch.zeros(self.rows, dtype=torch.long, device=dev)
        self.limit = torch.ones(self.rows, dtype=torch.long, device=dev)
        self.finished = torch.ones(self.rows, dtype=torch.bool, device=dev)
        self.stop_table = torch.full((self.rows, max(1, max(len(stop_ids[i]) for i in group.members))), -1, device=dev)
        self.next_token = torch.zeros(self.rows, 1, dtype=torch.long, device=dev)
        self.position = torch.zeros(self.rows, 1, dtype=torch.long, device=dev)
        self.slot = torch.zeros(self.rows, 1, dtype=torch.long, device=dev)
        self.temperature = torch.zeros(self.rows, device=dev)
        self.seed = torch.zeros(self.rows, dtype=torch.long, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.read_len = 0  # slots the decode step reads, rounded up: a CUDA graph per rounded length
        self.host_slot = [0] * self.rows  # each row's next slot as the host last knew it
        self.checked = [0] * self.rows  # tokens of each row already offered to stop_check
        self.counted = [0] * self.rows  # tokens of each row already on the progress bar

    def _rows(self) -> int:
        e = self.e
        n = len(self.queue)
        if e.max_batch is not None:
            n = min(n, e.max_batch)
        budget = e.budget
        if budget is None:
            rows = min(n, e.cpu_batch_tokens // max(1, self.max_len))
        else:
            per_row = self.max_len * e._kv_bytes_per_token()
            prefill = e._forward_bytes(1, max(len(s) for s in self.suffix.values()), self.n_prefix)
            rows = min(n, (budget - prefill) // per_row)
        return max(2 if e.device.type == "cpu" else 1, rows)  # CPU: two rows at least, see Engine._head

    def __iter__(self):
        while self.queue or any(o >= 0 for o in self.owner):
            self._refill()
            # slots advance at most one a step: read what the busiest row can have filled by the sync
            self.read_len = min(self.max_len, _bucket(max(self.host_slot) + self.e.sync_every))
            for _ in range(self.e.sync_every):
                self._step()
            yield self._collect()

    def _refill(self):
        free = [r for r in range(self.rows) if self.owner[r] < 0]
        joiners = [(r, self.queue.pop(0)) for r in free[: len(self.queue)]]
        by_width = defaultdict(list)
        for row, i in joiners:
            by_width[self.e._width(len(self.suffix[i]))].append((row, i))
        for group in by_width.values():
            self._prefill(group)

    def _prefill(self, joiners: list[tuple[int, int]]):
        """Prefill waiting requests into free rows; their first token comes from the prompt's last logits."""
        rows = torch.tensor([r for r, _ in joiners], device=self.e.device)
        tokens, positions, lengths = self.e._pad([self.suffix[i] for _, i in joiners], self.n_prefix)
        self.e._count(tokens)
        hidden = self.model.hidden(tokens, positions=positions, kv=self.cache.prefill(rows, positions), prefix=self.prefix)
        for row, i in joiners:
            self.temperature[row] = self.temperatures[i]
            self.seed[row] = self.seeds[i]
        self.n_new[rows] = 0
        first = self._pick(self.e._head(hidden[torch.arange(len(joiners), device=self.e.device), lengths - 1]), rows)
        for row, i in joiners:
            self.owner[row] = i
            self.checked[row] = self.counted[row] = 0
            ids = self.stop_ids[i]
            self.stop_table[row] = -1
            if ids:
                self.stop_table[row, : len(ids)] = torch.tensor(ids, device=self.e.device)
            self.limit[row] = self.max_new[i]
        self.slot[rows, 0] = lengths
        self.position[rows, 0] = lengths + self.n_prefix
        for (row, _), n in zip(joiners, lengths.tolist()):
            self.host_slot[row] = n
        self.finished[rows] = False
        self._accept(rows, first)

    def _accept(self, rows: Tensor, token: Tensor):
        """Record each row's new token unless the row has finished; finish on stop token or length."""
        live = ~self.finished[rows]
        is_stop = (self.stop_table[rows] == token[:, None]).any(-1)
        write = live & ~is_stop
        column = self.n_new[rows].clamp(max=self.tokens_out.shape[1] - 1)
        self.tokens_out[rows, column] = torch.where(write, token, self.tokens_out[rows, column])
        self.n_new[rows] += write.long()
        self.finished[rows] |= is_stop | (self.n_new[rows] >= self.limit[rows])
        self.next_token[rows, 0] = torch.where(self.finished[rows], self.next_token[rows, 0], token)

    def _decode(self):
        kv = self.cache.decode(self.slot, self.position, self.read_len, aligned=True)
        logits = self.model(self.next_token, positions=self.position, kv=kv, prefix=self.prefix)
        live = ~self.finished
        self.slot += live[:, None].long()  # finished rows keep rewriting one slot: static shapes, no growth
        self.position += live[:, None].long()
        self._accept(self.all_rows, self._pick(logits[:, -1], self.all_rows))

    def _pick(self, logits: Tensor, rows: Tensor) -> Tensor:
        """Greedy argmax, or Gumbel-max sampling for rows with a temperature."""
        if not self.sampling:
            return logits.argmax(-1)
        temperature = self.temperature[rows]
        noise = gumbel_noise(self.seed[rows], self.n_new[rows], logits.shape[-1])
        sampled = (logits.float() / temperature.clamp(min=1e-6)[:, None] + noise).argmax(-1)
        return torch.where(temperature > 0, sampled, logits.argmax(-1))

    @property
    def all_rows(self) -> Tensor:
        return torch.arange(self.rows, device=self.e.device)

    def _step(self):
        self.e.stats["decode_steps"] += 1
        self.e.stats["decode_slots_read"] += self.rows * self.read_len
        if not self.e.cuda_graphs:
            return self._decode()
        if self.read_len not in self.graphs:
            self.graphs[self.read_len] = self._capture()
        self.graphs[self.read_len].replay()

    def _capture(self) -> "torch.cuda.CUDAGraph":
        with torch.cuda.device(self.e.device):  # streams and Triton launches belong to the model's GPU, not GPU 0
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up kernels off the capture
                self._snapshot(self._decode)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            self._snapshot(lambda: self._capture_into(graph))
        return graph

    def _capture_into(self, graph):
        with torch.cuda.graph(graph):
            self._decode()

    def _snapshot(self, fn):
        """Run fn (a warm-up or a capture) without changing the decoder's state."""
        saved = [t.clone() for t in self._state()]
        cache_pos = self.cache.pos.clone()
        fn()
        for t, s in zip(self._state(), saved):
            t.copy_(s)
        self.cache.pos.copy_(cache_pos)

    def _state(self):
        return [self.tokens_out, self.n_new, self.finished, self.next_token, self.position, self.slot]

    def _collect(self) -> list[tuple[int, Generation]]:
        finished = self.finished.tolist()
        counts = self.n_new.tolist()
        out_rows = self.tokens_out.tolist()
        self.host_slot = self.slot[:, 0].tolist()
        done = []
        for row, i in enumerate(self.owner):
            if i < 0:
                continue
            new = out_rows[row][: counts[row]]
            cut = self._text_stop(row, i, new)
            if cut is not None:
                done.append((row, i, Generation(tuple(new[:cut]), "stop")))
            elif finished[row]:
                reason = "length" if counts[row] >= self.max_new[i] else "stop"
                done.append((row, i, Generation(tuple(new), reason)))
        self.bar.update(sum(counts[row] - self.counted[row] for row, i in enumerate(self.owner) if i >= 0)
                        + sum(self.max_new[i] - counts[row] for row, i, _ in done))
        self.counted = counts
        for row, _, _ in done:
            self.owner[row] = -1
        if done:
            self.finished[torch.tensor([r for r, _, _ in done], device=self.e.device)] = True
        return [(i, g) for _, i, g in done]

    def _text_stop(self, row: int, i: int, new: list[int]) -> int | None:
        """The shortest length at which stop_check holds, searching only tokens not yet checked."""
        if self.stop_check is None or not new or not self.stop_check(i, new):
            self.checked[row] = len(new)
            return None
        for n in range(max(1, self.checked[row]), len(new) + 1):
            if self.stop_check(i, new[:n]):
                return n
        return len(new)
