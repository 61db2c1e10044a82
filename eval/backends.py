"""Backends serve the three request kinds over whole lists of requests.

native: the native model through model/engine.py (the fast path).
hf:     plain `transformers`, batched as lm-evaluation-harness's HF backend (`--batch-size 1`: one
        request at a time, like the original scripts): the peer of the benchmarks. A Qwen (v1) checkpoint
        runs as `transformers`' Qwen2 with the same weights; Qwen2 has no dynamic NTK / LogN / windows, so
        the runner refuses those switches during planning (refuse_unapplied_switches).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable

import torch

from .api import (ChoiceRequest, ChoiceResponse, GenerateRequest, GenerateResponse, LoglikelihoodRequest,
                  LoglikelihoodResponse, ProfileResponse, UserError)

OnDone = Callable[[list[tuple[int, object]]], None] | None


def stop_rules_met(groups: tuple[tuple[str, ...], ...], text: str) -> bool:
    """True once every group of stop strings has a member in the text."""
    return bool(groups) and all(any(s in text for s in group) for group in groups)


class NativeBackend:
    name = "native"

    def __init__(self, model, tokenizer, *, batch_size: int | None = None, progress: bool = True,
                 kernels: str = "invariant", prefix_reuse: bool = True, fixed_new_tokens: int | None = None):
        from model import gptq, ops
        from model.engine import Engine

        # the kernel set, chosen here once for every layer; its name (run.json's "engine") decides the
        # numbers besides the weights: "invariant", "fast", or "cpu" (batch-invariant by construction),
        # and for a GPTQ checkpoint the Int4 layers' product
        model.ops = ops.select(kernels, next(model.parameters()).device)
        if kernels == "fast":
            gptq.use_int4mm(model, "tinygemm")  # the named fast Int4 product (on a GPU; a CPU keeps the reference)
        int4 = gptq.int4_path(model)
        self.mode = model.ops.name + (f", int4 {int4}" if int4 else "")
        self.model, self.tokenizer = model, tokenizer
        self.engine = Engine(model, max_batch=batch_size, progress=progress, share_prefix=prefix_reuse)
        self.fixed_new_tokens = fixed_new_tokens  # benchmarks only: every generation exactly this long

    @property
    def label(self) -> str:
        """Shown first on the progress bars: the pipeline sets the task being served."""
        return self.engine.label

    @label.setter
    def label(self, text: str) -> None:
        self.engine.label = text

    def choice(self, requests: list[ChoiceRequest], on_done: OnDone = None) -> list[ChoiceResponse]:
        def convert(i, r):
            return ChoiceResponse(r.logits, r.parity_probs, r.top_id in requests[i].choice_ids)

        results = self.engine.score_choices([r.tokens for r in requests], [r.choice_ids for r in requests],
                                            [r.shared_prefix for r in requests], on_done=_mapped(on_done, convert))
        return [convert(i, r) for i, r in enumerate(results)]

    def generate(self, requests: list[GenerateRequest], on_done: OnDone = None) -> list[GenerateResponse]:
        decode = self.tokenizer.decode
        if self.fixed_new_tokens:  # random weights never stop: fix the work a benchmark measures
            requests = [dataclasses.replace(r, max_new_tokens=self.fixed_new_tokens, stop=(), stop_ids=())
                        for r in requests]

        def convert(i, g):
            return GenerateResponse(g.tokens, decode(g.tokens), g.finish)

        results = self.engine.generate(
            [r.tokens for r in requests], [r.max_new_tokens for r in requests], [r.stop_ids for r in requests],
            shared_prefix=[r.shared_prefix for r in requests],
            stop_check=lambda i, new: stop_rules_met(requests[i].stop, decode(new)),
            on_done=_mapped(on_done, convert), temperature=[r.temperature for r in requests],
            seed=[r.seed for r in requests])
        return [convert(i, g) for i, g in enumerate(results)]

    def loglikelihood(self, requests: list[LoglikelihoodRequest], on_done: OnDone = None) -> list[LoglikelihoodResponse]:
        def convert(i, r):
            return LoglikelihoodResponse(*r)

        results = self.engine.loglikelihood([r.tokens for r in requests], [dict(r.switches) for r in requests],
                                            on_done=_mapped(on_done, convert))
        return [convert(i, r) for i, r in enumerate(results)]


def profile(backend, requests: list, on_done: OnDone = None) -> list[ProfileResponse]:
    """Serve each request alone after a short warm-up; wall time and peak device memory (GiB)."""
    cuda = torch.cuda.is_available() and next(backend.model.parameters()).is_cuda
    out = []
    for i, request in enumerate(requests):
        warm = request if not isinstance(request, GenerateRequest) else \
            GenerateRequest(request.prompt, request.tokens, 16, stop=request.stop, stop_ids=request.stop_ids)
        _serve_one(backend, warm)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        tokens = _serve_one(backend, request)
        if cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None  # no device memory to report on a CPU
        out.append(ProfileResponse(time.perf_counter() - start, tokens, peak))
        if on_done:
            on_done([(i, out[-1])])
    return out


def _serve_one(backend, request) -> int:
    if isinstance(request, GenerateRequest):
        return len(backend.generate([request])[0].tokens)
    backend.loglikelihood([request])
    return len(request.tokens)


def _mapped(on_done: OnDone, convert):
    if on_done is None:
        return None
    return lambda done: on_done([(i, convert(i, r)) for i, r in done])


def make_backend(config, native, tok):
    """The backend `config.backend` names, over the loaded native model, with its options
    (eval.run_config.BACKEND_OPTIONS)."""
    options = config.backend_options
    kw = dict(batch_size=config.batch_size, progress=not config.no_progress)
    if config.backend == "hf":
        return HFBackend.from_native(native, tok, device_map=options["device_map"], **kw)
    return NativeBackend(native, tok, kernels=options["kernels"], prefix_reuse=not options["no_prefix_reuse"],
                         fixed_new_tokens=options["fixed_new_tokens"], **kw)


def refuse_unapplied_switches(config, model_id: str, plans) -> None:
    """--backend hf runs transformers' Qwen2, which has no dynamic NTK, LogN or attention windows: refuse,
    before any weights load, a run that would need one (its run.json would record a switch never applied)."""
    if config.backend != "hf":
        return
    for plan in plans:
        if any(getattr(r, "switches", ()) for requests in plan.requests for r in requests):
            raise UserError(f"--task {plan.task.name} switches dynamic NTK / LogN / windows per row, which "
                            "transformers' Qwen2 lacks: use --backend native")
    if config.window_attn and config.window_attn.strip().lower() not in ("none", "off"):
        raise UserError(f"--window-attn {config.window_attn}: transformers' Qwen2 (--backend hf) has no attention "
                        "windows; drop the flag or use --backend native")
    checkpoint = _config_args(model_id) if None in (config.dynamic_ntk, config.logn) else None
    switches = (("dynamic-ntk", "use_dynamic_ntk", config.dynamic_ntk), ("logn", "use_logn_attn", config.logn))
    on = [f"--{flag}" if given else f"config.json {key}=true"
          for flag, key, given in switches if (given if given is not None else getattr(checkpoint, key))]
    if on:
        raise UserError(f"--backend hf runs transformers' Qwen2, which has no dynamic NTK or LogN; this run turns "
                        f"them on ({' and '.join(on)}): pass --no-dynamic-ntk --no-logn to evaluate without them, "
                        "or use --backend native")


def _config_args(model_id: str):
    """The checkpoint's config alone (a hub id fetches config.json only)."""
    from model import ConfigError, ModelLoadError
    from model.config import read_config
    from model.loading import resolve_checkpoint

    try:
        return read_config(resolve_checkpoint(model_id, patterns=["config.json"]) / "config.json")
    except (ModelLoadError, ConfigError) as err:
        raise UserError(str(err)) from None


class HFBackend:
    """Plain transformers, batched as lm-evaluation-harness's HF backend batches: requests sorted longest first
    (an out-of-memory error shows at the first batch), as many rows per batch as the memory budget holds at
    the batch's longest length, or `batch_size` rows (1: the original scripts' one request at a time).
    Results come back in input order; on_done hears of each batch as it finishes."""

    name = "hf"
    MAX_BATCH = 64  # lm-evaluation-harness's default ceiling for --batch_size auto
    CPU_BUDGET = 2 * 2**30  # bytes of activations per batch on a CPU: a simple fixed budget
    LOGIT_ROWS = 1024  # positions per lm_head call in rolling loglikelihood: never [B, T, vocab] at once
    label = ""  # shown first on the progress bar (the task being served)

    def __init__(self, model, tokenizer, *, batch_size: int | None = None, progress: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = batch_size  # None: sized from memory, batch by batch
        self.progress = progress
        param = next(model.parameters())
        self.device, self.elt = param.device, param.element_size()  # inputs go where the embedding is
        model.generation_config.eos_token_id = None  # stop tokens are each request's own (_RowEnds)

    @classmethod
    def from_native(cls, native_model, tokenizer, device_map: str | None = None, **kw) -> "HFBackend":
        """The native weights as transformers' Qwen2; device_map "auto" spreads its layers over every GPU
        (accelerate), for a model larger than one GPU."""
        from model.convert import to_transformers

        hf = to_transformers(native_model)
        if device_map:
            from accelerate import dispatch_model, infer_auto_device_map

            placement = infer_auto_device_map(hf, no_split_module_classes=["Qwen2DecoderLayer"])
            hf = dispatch_model(hf, placement)
        return cls(hf, tokenizer, **kw)

    # -- batch sizing -------------------------------------------------------------------------------------

    def _activation_bytes(self, n: int) -> int:
        """Peak activations of one row of n tokens in a forward pass that keeps no KV cache (use_cache=False):
        the native planner's estimate (SDPA keeps no [T, T] scores on a GPU)."""
        from model.planner import activation_bytes

        c = self.model.config
        return activation_bytes(n, c.hidden_size, c.intermediate_size, self.elt)

    def _kv_bytes(self, n: int) -> int:
        """transformers' dynamic cache for n positions; each step concatenates a layer's keys and values into
        new tensors, so one more layer's worth lives for a moment."""
        c = self.model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        return n * 2 * (c.num_hidden_layers + 1) * kv_heads * head_dim * self.elt

    def _budget(self) -> int:
        """Bytes a batch may use: 60% of the free memory of the fullest GPU holding the model (asked once
        per call, never per batch), or CPU_BUDGET on a CPU."""
        gpus = {p.device for p in self.model.parameters() if p.device.type == "cuda"}
        if not gpus:
            return self.CPU_BUDGET
        free = min(torch.cuda.mem_get_info(d)[0] + torch.cuda.memory_reserved(d) - torch.cuda.memory_allocated(d)
                   for d in gpus)
        return int(0.6 * free)

    def _serve(self, lengths: list[int], row_bytes: Callable[[int], int], work, on_done: OnDone,
               fixed: int = 0) -> list:
        """Responses in input order: work(indices) -> [(index, response)] over batches, longest first (ties
        keep input order), each as many rows as the budget (less `fixed` bytes per batch) holds at its
        longest length. When the device runs out of memory anyway, the batch is halved and tried again, and
        no later batch of this list is larger (lm-evaluation-harness's automatic batch size does the same)."""
        from tqdm.auto import tqdm

        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        budget = self._budget() - fixed if self.batch_size is None else 0
        ceiling = self.batch_size or self.MAX_BATCH
        out: list = [None] * len(lengths)
        bar = tqdm(total=len(order), disable=not self.progress, leave=False, desc=f"{self.label} hf".strip())
        start = 0
        while start < len(order):
            fits = max(1, budget // row_bytes(lengths[order[start]])) if self.batch_size is None else ceiling
            size = min(ceiling, fits, len(order) - start)
            done = self._attempt(work, order[start:start + size])
            if done is None:
                if size == 1:
                    raise UserError(f"--backend hf: out of memory on one row of {lengths[order[start]]} tokens; "
                                    "free GPU memory, or spread the model with --device-map auto")
                ceiling = size // 2
                print(f"hf: out of memory at {size} rows per batch; going on at {ceiling}", file=sys.stderr)
                continue
            _deliver(done, out, on_done)
            bar.update(len(done))
            start += size
        bar.close()
        return out

    def _attempt(self, work, idx: list[int]):
        """work(idx), or None when the device ran out of memory (its tensors are freed before returning)."""
        try:
            return work(idx)
        except torch.cuda.OutOfMemoryError:
            pass  # leaving the handler drops the traceback and, with it, the failed batch's tensors
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None

    def _padded(self, seqs, left: bool):
        """[B, T] ids padded with the end-of-text id, and the mask of real tokens."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tokenizer.eod_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, s in enumerate(seqs):
            span = slice(width - len(s), width) if left else slice(0, len(s))
            ids[row, span] = torch.tensor(s)
            mask[row, span] = 1
        return ids.to(self.device), mask.to(self.device)

    def _hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden states [B, T, dim] of right-padded rows; no KV cache is built."""
        return self.model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state

    # -- the three request kinds --------------------------------------------------------------------------

    @torch.inference_mode()
    def choice(self, requests: list[ChoiceRequest], on_done: OnDone = None) -> list[ChoiceResponse]:
        """One forward per question; only the last real position of each row reaches lm_head. Rows are padded
        on the right, so no real token sees a pad and positions are those of the row alone: no mask needed."""
        logits_bytes = 3 * 4 * self.model.config.vocab_size  # fp32 logits, softmax, a copy: per row

        def work(idx):
            ids, mask = self._padded([requests[i].tokens for i in idx], left=False)
            hidden = self._hidden(ids)  # [B, T, dim]
            last = hidden[torch.arange(len(idx), device=hidden.device), mask.sum(1).to(hidden.device) - 1]
            logits = self.model.get_output_embeddings()(last)  # [B, vocab]
            return [(i, _choice_response(logits[row], requests[i].choice_ids)) for row, i in enumerate(idx)]

        return self._serve([len(r.tokens) for r in requests], lambda n: self._activation_bytes(n) + logits_bytes,
                           work, on_done)

    @torch.inference_mode()
    def generate(self, requests: list[GenerateRequest], on_done: OnDone = None) -> list[GenerateResponse]:
        """Batched greedy `generate` on left-padded rows (transformers derives positions from the mask);
        _RowEnds ends each row at its stop token, stop rule or length, and the batch once every row has."""
        longest_new = max((r.max_new_tokens for r in requests), default=0)
        logits_bytes = 3 * 4 * self.model.config.vocab_size

        def row_bytes(n):  # the cache, the prefill, the last position's logits, a [T, T + new] boolean mask
            return self._kv_bytes(n + longest_new) + self._activation_bytes(n) + logits_bytes + n * (n + longest_new)

        return self._serve([len(r.tokens) for r in requests], row_bytes,
                           lambda idx: self._generate([requests[i] for i in idx], idx), on_done)

    def _generate(self, batch: list[GenerateRequest], idx: list[int]) -> list:
        from transformers import LogitsProcessorList, StoppingCriteriaList

        ids, mask = self._padded([r.tokens for r in batch], left=True)
        ends = _RowEnds(batch, ids.shape[1], self.tokenizer.decode)
        sampling = [_GumbelSampling(batch, ids.shape[1])] if any(r.temperature > 0 for r in batch) else []
        gen = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                  max_new_tokens=max(r.max_new_tokens for r in batch),
                                  pad_token_id=self.tokenizer.eod_id, repetition_penalty=1.0,
                                  logits_processor=LogitsProcessorList(sampling),
                                  stopping_criteria=StoppingCriteriaList([ends]))
        new = gen[:, ids.shape[1]:].tolist()
        done = []
        for row, i in enumerate(idx):
            tokens = new[row][: ends.end[row]]
            done.append((i, GenerateResponse(tuple(tokens), self.tokenizer.decode(tokens), ends.finish[row])))
        return done

    @torch.inference_mode()
    def loglikelihood(self, requests: list[LoglikelihoodRequest], on_done: OnDone = None) -> list[LoglikelihoodResponse]:
        """Summed next-token NLL, rows right-padded (as in choice); lm_head runs on LOGIT_ROWS real positions
        at a time."""
        if any(r.switches for r in requests):
            raise UserError("the hf backend cannot switch dynamic NTK / LogN / windows per request; use --backend native")
        dim = self.model.config.hidden_size
        logit_chunk = 3 * 4 * self.LOGIT_ROWS * self.model.config.vocab_size  # fp32 logits, loss: once per batch

        def work(idx):
            ids, mask = self._padded([requests[i].tokens for i in idx], left=False)
            nll = self._summed_nll(self._hidden(ids)[:, :-1], ids[:, 1:], mask[:, 1:].bool())
            return [(i, LoglikelihoodResponse(nll[row], len(requests[i].tokens) - 1)) for row, i in enumerate(idx)]

        # the hidden states and their gathered real positions outlive the forward: 2 x dim per token
        return self._serve([len(r.tokens) for r in requests], lambda n: self._activation_bytes(n) + 2 * n * dim * self.elt,
                           work, on_done, fixed=logit_chunk)

    def _summed_nll(self, hidden, targets, real) -> list[float]:
        """Per-row sum of -log p(target) over the real positions (fp32 logits, fp64 sums)."""
        real, targets = real.to(hidden.device), targets.to(hidden.device)
        rows = torch.arange(len(hidden), device=hidden.device)[:, None].expand_as(real)[real]  # [N]
        flat, targets = hidden[real], targets[real]  # [N, dim], [N]
        nll = torch.zeros(len(hidden), dtype=torch.float64)
        for start in range(0, len(flat), self.LOGIT_ROWS):
            part = slice(start, start + self.LOGIT_ROWS)
            logits = self.model.get_output_embeddings()(flat[part]).float()  # [<= LOGIT_ROWS, vocab]
            loss = torch.nn.functional.cross_entropy(logits, targets[part].to(logits.device), reduction="none")
            nll.index_add_(0, rows[part].cpu(), loss.double().cpu())
        return nll.tolist()


def _choice_response(logits: torch.Tensor, choice_ids: tuple[int, ...]) -> ChoiceResponse:
    ids = list(choice_ids)
    exact = tuple(logits[ids].float().tolist())
    parity = tuple(logits.softmax(-1)[ids].softmax(-1).float().tolist())  # the original's, in the model dtype
    return ChoiceResponse(exact, parity, int(logits.argmax()) in ids)


def _deliver(done: list, out: list, on_done: OnDone) -> None:
    for i, response in done:
        out[i] = response
    if on_done:
        on_done(done)


class _RowEnds:
    """A transformers stopping criterion: ends each row at its first stop token (excluded), at the shortest
    output on which its stop rules hold (where batch 1 stops), or at its own max_new_tokens; generate ends
    the batch once every row has ended. end[row] and finish[row] say where and why."""

    def __init__(self, requests: list[GenerateRequest], width: int, decode):
        self.requests, self.width, self.decode = requests, width, decode
        self.end: list[int | None] = [None] * len(requests)
        self.finish = ["length"] * len(requests)

    def __call__(self, input_ids: torch.Tensor, scores, **kw) -> torch.Tensor:
        n = input_ids.shape[1] - self.width  # tokens generated so far, the newest included
        last = input_ids[:, -1].tolist()
        for row, r in enumerate(self.requests):
            if self.end[row] is not None:
                continue
            if last[row] in r.stop_ids:
                self.end[row], self.finish[row] = n - 1, "stop"
            elif r.stop and stop_rules_met(r.stop, self.decode(input_ids[row, self.width:].tolist())):
                self.end[row], self.finish[row] = n, "stop"
            elif n >= r.max_new_tokens:
                self.end[row] = n
        return torch.tensor([e is not None for e in self.end], device=input_ids.device)


class _GumbelSampling:
    """A transformers logits processor: temperature sampling for the rows that ask for it, as Gumbel-max on
    top of greedy decoding with the native engine's noise keyed by (seed, step), so a request's sample does
    not depend on its batch."""

    def __init__(self, requests: list[GenerateRequest], width: int):
        self.width = width
        self.temperature = torch.tensor([r.temperature for r in requests], dtype=torch.float32)
        self.seed = torch.tensor([r.seed for r in requests], dtype=torch.long)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        from model.decoder import gumbel_noise

        t, seed = self.temperature.to(scores.device), self.seed.to(scores.device)
        step = torch.full_like(seed, input_ids.shape[1] - self.width)
        sampled = scores.float() / t.clamp(min=1e-6)[:, None] + gumbel_noise(seed, step, scores.shape[-1])
        return torch.where(t[:, None] > 0, sampled, scores.float())
