"""Batched inference over token ids: the three request kinds (choice scores, rolling log-likelihood,
greedy or sampled generation), served over whole lists of requests.

Where the speed comes from:
- requests are grouped by their shared prefix (the few-shot shots); the prefix K/V is computed once
  and every row of a batch attends to that one tensor (no per-row copy); a prefix that one request
  alone reads goes whole with its prompt, batched with the others, where the op set keeps the bits
  (planner.py);
- rows are sorted by length and batched to a memory budget derived from free device memory (planner.py);
- generation keeps a static KV cache, decodes all rows in one fixed-shape step (CUDA-graphed on a
  GPU), checks stop conditions on the host only every `sync_every` steps, and refills the rows of
  finished sequences with waiting ones (continuous batching: decoder.py);
- only the positions that are scored reach the LM head, in chunks for long sequences.
Results come back in input order and do not depend on how requests were batched: on a CPU because a
batch only mixes rows of one padded width; on a GPU with the batch-invariant op set (model/ops.py,
chosen by whoever built the model) because every product, norm and attention has one order per row,
and the few reductions left to the engine (choice logits, summed NLL) are done per row on the host.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .config import ModelArgs, with_switches
from .decoder import Decoder, Generation, Generations, head_logits
from .planner import Group, Planner
from .qwen import KVCache, Qwen


@dataclass(frozen=True)
class ChoiceResult:
    logits: tuple[float, ...]  # fp32 logits of the choice tokens
    parity_probs: tuple[float, ...]  # softmax over the choices of the full-vocab softmax, in the model dtype
    top_id: int


Done = Callable[[list[tuple[int, object]]], None]  # called with (request index, result) pairs per batch


class Engine:
    """Serves request lists on a model with whatever op set it was built with (no kernel choice here)."""

    def __init__(self, model: Qwen, *, max_batch: int | None = None, sync_every: int = 16, progress: bool = True,
                 cuda_graphs: bool = True, loss_chunk: int = 1024, share_prefix: bool = True):
        self.model = model
        self.planner = Planner(model, max_batch, share_prefix)
        self.device, self.dtype = self.planner.device, self.planner.dtype
        self.sync_every = sync_every
        self.progress = progress
        self.label = ""  # what is being served (the runner sets the task's name), first on every progress bar
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.loss_chunk = loss_chunk
        self.stats = Counter()  # forwards, tokens, decode steps and slots read: for benchmarks
        self._head_rows: dict[int, np.ndarray] = {}  # fp32 LM-head rows of choice ids, on the host

    def _prefix_cache(self, group: Group) -> KVCache | None:
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
        """The planner's padded batch, counted as one forward."""
        tokens, positions, lengths = self.planner.pad(seqs, start)
        self.stats.update(forwards=1, forward_tokens=tokens.numel())
        return tokens, positions, lengths

    def _bar(self, total: int, desc: str, unit: str = "doc"):
        name = f"{self.label} {desc}" if self.label else desc
        return tqdm(total=total, desc=name, unit=unit, disable=not self.progress, dynamic_ncols=True, leave=False)

    # ---- 1. choice scores ---------------------------------------------------------------------
    @torch.inference_mode()
    def score_choices(self, prompts: Sequence[Sequence[int]], choice_ids: Sequence[Sequence[int]],
                      shared_prefix: Sequence[int] | None = None, on_done: Done | None = None) -> list[ChoiceResult]:
        shared = shared_prefix or [0] * len(prompts)
        results: list[ChoiceResult | None] = [None] * len(prompts)
        self.planner.measure_budget()
        with self._bar(len(prompts), "choice") as bar:
            for group in self.planner.groups(prompts, shared, [len(p) for p in prompts]):
                prefix = self._prefix_cache(group)
                n_prefix = len(group.prefix)
                suffixes = {i: prompts[i][n_prefix:] for i in group.members}
                lengths = {i: len(s) for i, s in suffixes.items()}
                order = sorted(group.members, key=lambda i: -lengths[i])
                for batch in self.planner.batches(order, lengths, n_prefix):
                    _deliver(self._score_batch(batch, suffixes, choice_ids, prefix, n_prefix), results, on_done, bar)
        return results

    def _score_batch(self, batch, suffixes, choice_ids, prefix, n_prefix):
        tokens, positions, lengths = self._pad([suffixes[i] for i in batch], n_prefix)
        hidden = self.model.hidden(tokens, positions=positions, prefix=prefix)
        last = hidden[torch.arange(len(batch), device=self.device), lengths - 1]  # [b, dim]
        logits = head_logits(self.model, last)  # model dtype, as the original
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
        self.planner.measure_budget()
        with self._bar(len(sequences), "loglikelihood") as bar:
            for key, members in by_switch.items():
                switches = with_switches(self.model.args, **dict(key))
                lengths = {i: len(sequences[i]) for i in members}
                order = sorted(members, key=lambda i: -lengths[i])
                # a loss chunk's fp32 logits and their log-softmax, per row
                chunk_bytes = 3 * 4 * self.loss_chunk * switches.vocab_size
                for batch in self.planner.batches(order, lengths, 0, chunk_bytes):
                    _deliver(self._nll_batch(batch, sequences, switches), results, on_done, bar)
        return results

    def _nll_batch(self, batch, sequences, switches: ModelArgs):
        tokens, positions, lengths = self._pad([sequences[i] for i in batch], 0)
        hidden = self.model.hidden(tokens, positions=positions, switches=switches)
        losses: list[list[float]] = [[] for _ in batch]  # every position's loss, summed exactly at the end
        width = tokens.shape[1]
        for start in range(0, width - 1, self.loss_chunk):  # never all vocab logits of a long row at once
            stop = min(start + self.loss_chunk, width - 1)
            logits = self.model.logits(hidden[:, start:stop]).float()  # [b, chunk, vocab]
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
        n = len(prompts)
        requests = Generations(prompts, max_new_tokens, stop_ids, stop_check, list(temperature or [0.0] * n),
                               list(seed or [0] * n))
        results: list[Generation | None] = [None] * n
        self.planner.measure_budget()
        # counted in tokens of the budget (a request that stops early hands in the rest): the ETA moves
        # every sync, not only when a whole request ends
        with self._bar(sum(max_new_tokens), "generate", unit="tok") as bar:
            for group in self.planner.groups(prompts, shared_prefix or [0] * n, [len(p) for p in prompts]):
                decoder = Decoder(self.model, self.planner, requests, group, self._prefix_cache(group), bar,
                                  self.sync_every, self.cuda_graphs)
                for done in decoder:
                    _deliver(done, results, on_done, None)
                self.stats.update(decoder.stats)
        return results


def _deliver(done: list, results: list, on_done: Done | None, bar) -> None:
    """Place a finished batch's (index, result) pairs and report them."""
    for i, r in done:
        results[i] = r
    if on_done:
        on_done(done)
    if bar is not None:
        bar.update(len(done))
