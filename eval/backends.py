"""Backends serve the three request kinds over whole lists of requests.

native: the native model through model/engine.py (the fast path).
hf:     plain `transformers`, batch 1 by default like the original scripts: the baseline of the
        benchmarks, and a way to evaluate any Hugging Face causal LM. A Qwen (v1) checkpoint runs as
        `transformers`' Qwen2 with the same weights (Qwen2 has no dynamic NTK / LogN / windows).
"""
from __future__ import annotations

from typing import Callable

import torch

import time

from .api import (ChoiceRequest, ChoiceResponse, GenerateRequest, GenerateResponse, LoglikelihoodRequest,
                  LoglikelihoodResponse, ProfileResponse, UserError)

OnDone = Callable[[list[tuple[int, object]]], None] | None


def stop_rules_met(groups: tuple[tuple[str, ...], ...], text: str) -> bool:
    """True once every group of stop strings has a member in the text."""
    return bool(groups) and all(any(s in text for s in group) for group in groups)


class NativeBackend:
    name = "native"

    def __init__(self, model, tokenizer, *, batch_size: int | None = None, progress: bool = True):
        from model.engine import Engine

        self.model, self.tokenizer = model, tokenizer
        self.engine = Engine(model, max_batch=batch_size, progress=progress)

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


class HFBackend:
    """The plain transformers path: one request at a time unless batch_size says otherwise."""

    name = "hf"
    label = ""  # shown first on the progress bar (the task being served)

    def __init__(self, model, tokenizer, *, batch_size: int | None = None, progress: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = batch_size or 1
        self.progress = progress
        self.device = next(model.parameters()).device

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

    def _batches(self, requests):
        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests), disable=not self.progress, leave=False, desc=f"{self.label} hf".strip())
        for start in range(0, len(requests), self.batch_size):
            idx = list(range(start, min(start + self.batch_size, len(requests))))
            yield idx
            bar.update(len(idx))
        bar.close()

    def _left_padded(self, seqs):
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, width - len(s):] = torch.tensor(s)
            mask[row, width - len(s):] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def choice(self, requests: list[ChoiceRequest], on_done: OnDone = None) -> list[ChoiceResponse]:
        out = []
        for idx in self._batches(requests):
            ids, mask = self._left_padded([requests[i].tokens for i in idx])
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, -1]
            done = []
            for row, i in enumerate(idx):
                choice_ids = list(requests[i].choice_ids)
                exact = tuple(logits[row, choice_ids].float().tolist())
                parity = tuple(logits[row].softmax(-1)[choice_ids].softmax(-1).float().tolist())
                done.append((i, ChoiceResponse(exact, parity, int(logits[row].argmax()) in choice_ids)))
            out += [r for _, r in done]
            if on_done:
                on_done(done)
        return out

    @torch.inference_mode()
    def generate(self, requests: list[GenerateRequest], on_done: OnDone = None) -> list[GenerateResponse]:
        from transformers import StoppingCriteria, StoppingCriteriaList

        decode = self.tokenizer.decode
        out = []
        for idx in self._batches(requests):
            ids, mask = self._left_padded([requests[i].tokens for i in idx])
            width = ids.shape[1]
            rules = [requests[i].stop for i in idx]

            class TextStop(StoppingCriteria):  # a host round trip per token: this is the plain baseline
                def __call__(self, input_ids, scores, **kw):
                    return torch.tensor([stop_rules_met(r, decode(row[width:].tolist())) for r, row in zip(rules, input_ids)],
                                        device=input_ids.device)

            stop_ids = sorted({t for i in idx for t in requests[i].stop_ids})
            gen = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                      max_new_tokens=max(requests[i].max_new_tokens for i in idx),
                                      eos_token_id=stop_ids or None, pad_token_id=self.tokenizer.eod_id,
                                      stopping_criteria=StoppingCriteriaList([TextStop()]), repetition_penalty=1.0)
            done = [(i, self._response(requests[i], gen[row, width:].tolist())) for row, i in enumerate(idx)]
            out += [r for _, r in done]
            if on_done:
                on_done(done)
        return out

    def _response(self, request: GenerateRequest, new: list[int]) -> GenerateResponse:
        cut = next((k for k, t in enumerate(new) if t in request.stop_ids), None)
        tokens = new[:cut] if cut is not None else new[: request.max_new_tokens]
        finish = "stop" if cut is not None or stop_rules_met(request.stop, self.tokenizer.decode(tokens)) else "length"
        return GenerateResponse(tuple(tokens), self.tokenizer.decode(tokens), finish)

    @torch.inference_mode()
    def loglikelihood(self, requests: list[LoglikelihoodRequest], on_done: OnDone = None) -> list[LoglikelihoodResponse]:
        if any(r.switches for r in requests):
            raise UserError("the hf backend cannot switch dynamic NTK / LogN / windows per request; use --backend native")
        out = []
        for idx in self._batches(requests):
            done = []
            for i in idx:  # one sequence at a time: rows of long-context samples are long already
                ids = torch.tensor(requests[i].tokens, device=self.device)[None]
                hidden = self.model.model(input_ids=ids).last_hidden_state
                nll = 0.0
                for start in range(0, ids.shape[1] - 1, 1024):
                    stop = min(start + 1024, ids.shape[1] - 1)
                    logits = self.model.lm_head(hidden[:, start:stop]).float()
                    nll += torch.nn.functional.cross_entropy(logits[0], ids[0, start + 1: stop + 1], reduction="sum").item()
                done.append((i, LoglikelihoodResponse(nll, ids.shape[1] - 1)))
            out += [r for _, r in done]
            if on_done:
                on_done(done)
        return out
