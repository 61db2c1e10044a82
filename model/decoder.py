"""Generation: continuous batching over a static KV cache, the decode step (CUDA-graphed on a GPU) and sampling.

All rows decode in one fixed-shape step; the host checks stop conditions only every `sync_every` steps and
refills the rows of finished sequences with waiting ones. The step runs the model's op set, whichever it
is: the capture code is one for both, so the fast path's graph proves the invariant one's too.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .planner import Group, Planner
from .qwen import KVCache, Qwen


@dataclass(frozen=True)
class Generation:
    tokens: tuple[int, ...]  # new tokens, the stop token excluded
    finish: str  # "stop" or "length"


@dataclass(frozen=True)
class Generations:
    """The requests of one generate call, by index."""

    prompts: Sequence[Sequence[int]]
    max_new: Sequence[int]
    stop_ids: Sequence[Sequence[int]]
    stop_check: Callable[[int, list[int]], bool] | None  # (i, new tokens) -> request i may stop
    temperature: Sequence[float]
    seed: Sequence[int]


def head_logits(model: Qwen, rows: Tensor) -> Tensor:
    """LM head over [b, dim]. A one-row product would take BLAS's matrix-vector path, which sums in
    another order than the matrix-matrix path of larger batches; two rows keep results independent
    of the batch size."""
    if rows.shape[0] > 1:
        return model.logits(rows)
    return model.logits(rows.expand(2, -1))[:1]


def bucket(n: int) -> int:
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


class Decoder:
    """Continuous batching of one prefix group; iterating yields each sync's finished (index, Generation)
    pairs. `stats` counts its forwards, tokens, decode steps and cache slots read."""

    def __init__(self, model: Qwen, planner: Planner, requests: Generations, group: Group, prefix: KVCache | None,
                 bar, sync_every: int, cuda_graphs: bool):
        self.model, self.planner, self.r, self.bar = model, planner, requests, bar
        self.sync_every, self.cuda_graphs = sync_every, cuda_graphs
        self.stats = Counter()
        self.sampling = any(requests.temperature[i] > 0 for i in group.members)
        self.prefix, self.n_prefix = prefix, len(group.prefix)
        self.suffix = {i: requests.prompts[i][self.n_prefix:] for i in group.members}
        self.queue = sorted(group.members, key=lambda i: -len(self.suffix[i]))  # longest first
        longest_new = max(requests.max_new[i] for i in group.members)
        self.max_len = max(planner.width(len(s)) for s in self.suffix.values()) + longest_new
        self.rows = planner.decode_rows(len(self.queue), self.max_len, max(map(len, self.suffix.values())), self.n_prefix)
        self._allocate(longest_new, max(1, max(len(requests.stop_ids[i]) for i in group.members)))
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.read_len = 0  # slots the decode step reads, rounded up: a CUDA graph per rounded length
        self.owner = [-1] * self.rows  # request index per row
        self.host_slot = [0] * self.rows  # each row's next slot as the host last knew it
        self.checked = [0] * self.rows  # tokens of each row already offered to stop_check
        self.counted = [0] * self.rows  # tokens of each row already on the progress bar

    def _allocate(self, longest_new: int, stop_width: int) -> None:
        """The static device state every step reads and writes (fixed shapes: one graph per read length)."""
        rows, dev = self.rows, self.planner.device
        self.cache = KVCache.empty(self.model.args, rows, self.max_len, self.planner.dtype, dev)
        self.tokens_out = torch.zeros(rows, longest_new, dtype=torch.long, device=dev)
        self.n_new = torch.zeros(rows, dtype=torch.long, device=dev)
        self.limit = torch.ones(rows, dtype=torch.long, device=dev)
        self.finished = torch.ones(rows, dtype=torch.bool, device=dev)
        self.stop_table = torch.full((rows, stop_width), -1, device=dev)
        self.next_token = torch.zeros(rows, 1, dtype=torch.long, device=dev)
        self.position = torch.zeros(rows, 1, dtype=torch.long, device=dev)
        self.slot = torch.zeros(rows, 1, dtype=torch.long, device=dev)
        self.temperature = torch.zeros(rows, device=dev)
        self.seed = torch.zeros(rows, dtype=torch.long, device=dev)
        self.all_rows = torch.arange(rows, device=dev)

    def __iter__(self):
        while self.queue or any(o >= 0 for o in self.owner):
            self._refill()
            # slots advance at most one a step: read what the busiest row can have filled by the sync
            self.read_len = min(self.max_len, bucket(max(self.host_slot) + self.sync_every))
            for _ in range(self.sync_every):
                self._step()
            yield self._collect()

    # ---- joining ----------------------------------------------------------------------------------
    def _refill(self):
        free = [r for r in range(self.rows) if self.owner[r] < 0]
        joiners = [(r, self.queue.pop(0)) for r in free[: len(self.queue)]]
        by_width = defaultdict(list)
        for row, i in joiners:
            by_width[self.planner.width(len(self.suffix[i]))].append((row, i))
        for group in by_width.values():
            self._prefill(group)

    def _prefill(self, joiners: list[tuple[int, int]]):
        """Prefill waiting requests into free rows; their first token comes from the prompt's last logits."""
        dev = self.planner.device
        rows = torch.tensor([r for r, _ in joiners], device=dev)
        tokens, positions, lengths = self.planner.pad([self.suffix[i] for _, i in joiners], self.n_prefix)
        self.stats.update(forwards=1, forward_tokens=tokens.numel())
        hidden = self.model.hidden(tokens, positions=positions, kv=self.cache.prefill(rows, positions), prefix=self.prefix)
        for row, i in joiners:
            self.temperature[row] = self.r.temperature[i]
            self.seed[row] = self.r.seed[i]
        self.n_new[rows] = 0
        first = self._pick(head_logits(self.model, hidden[torch.arange(len(joiners), device=dev), lengths - 1]), rows)
        for row, i in joiners:
            self.owner[row] = i
            self.checked[row] = self.counted[row] = 0
            ids = self.r.stop_ids[i]
            self.stop_table[row] = -1
            if ids:
                self.stop_table[row, : len(ids)] = torch.tensor(ids, device=dev)
            self.limit[row] = self.r.max_new[i]
        self.slot[rows, 0] = lengths
        self.position[rows, 0] = lengths + self.n_prefix
        for (row, _), n in zip(joiners, lengths.tolist()):
            self.host_slot[row] = n
        self.finished[rows] = False
        self._accept(rows, first)

    # ---- the decode step --------------------------------------------------------------------------
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
        """One step for every row: device work only, no host sync, static shapes (capturable)."""
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

    def _step(self):
        self.stats.update(decode_steps=1, decode_slots_read=self.rows * self.read_len)
        if not self.cuda_graphs:
            return self._decode()
        if self.read_len not in self.graphs:
            self.graphs[self.read_len] = self._capture()
        self.graphs[self.read_len].replay()

    # ---- CUDA graphs ------------------------------------------------------------------------------
    def _capture(self) -> torch.cuda.CUDAGraph:
        with torch.cuda.device(self.planner.device):  # streams and Triton launches belong to the model's GPU
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up kernels (compile, autotune) off the capture
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
        state = [self.tokens_out, self.n_new, self.finished, self.next_token, self.position, self.slot, self.cache.pos]
        saved = [t.clone() for t in state]
        fn()
        for t, s in zip(state, saved):
            t.copy_(s)

    # ---- the host's sync --------------------------------------------------------------------------
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
                reason = "length" if counts[row] >= self.r.max_new[i] else "stop"
                done.append((row, i, Generation(tuple(new), reason)))
        self.bar.update(sum(counts[row] - self.counted[row] for row, i in enumerate(self.owner) if i >= 0)
                        + sum(self.r.max_new[i] - counts[row] for row, i, _ in done))
        self.counted = counts
        for row, _, _ in done:
            self.owner[row] = -1
        if done:
            self.finished[torch.tensor([r for r, _, _ in done], device=self.planner.device)] = True
        return [(i, g) for _, i, g in done]

    def _text_stop(self, row: int, i: int, new: list[int]) -> int | None:
        """The shortest length at which stop_check holds, searching only tokens not yet checked."""
        if self.r.stop_check is None or not new or not self.r.stop_check(i, new):
            self.checked[row] = len(new)
            return None
        for n in range(max(1, self.checked[row]), len(new) + 1):
            if self.r.stop_check(i, new[:n]):
                return n
        return len(new)
