"""A small OpenAI-compatible server for the tests (aiohttp.web on 127.0.0.1): the native engine behind
/v1/models, /v1/completions and /v1/chat/completions, answering as vLLM does (token-id prompts, top
log-probabilities, echo, stop strings with include_stop_str_in_output, stop_token_ids, ChatML chat template).

`Behaviour` makes it misbehave the ways real endpoints do: a key, no echo, fewer or no log-probabilities,
429 and 500 at random (seeded, bounded), or no answer at all after N completions (a run to kill).
"""
from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass

import torch
from aiohttp import web

from model.engine import Engine
from model.tokenizer import SPECIAL_TOKENS

CHATML_TURN = "<|im_start|>{role}\n{content}<|im_end|>\n"  # Qwen's chat template, as vLLM renders it


@dataclass
class Behaviour:
    key: str | None = None  # required as "Authorization: Bearer KEY" when set
    max_logprobs: int = 20  # vLLM's default ceiling; 0: no log-probabilities at all (a 400 when asked)
    echo: bool = True
    failure_rate: float = 0.0  # the share of POSTs answered 429 or 500 ...
    max_failures: int = 0  # ... at most this many times in all
    seed: int = 0
    hang_after: int | None = None  # POSTs answered before the later ones hang (until this is set to None)


class ServedModel:
    """The three things a completion needs from the model: greedy/sampled tokens, and log-probabilities."""

    def __init__(self, model, tok, name: str):
        self.model, self.tok, self.name = model, tok, name
        self.engine = Engine(model, progress=False)

    def encode_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, str):  # text, as a served tokenizer reads it: NFC, special tokens recognised
            return self.tok.encode(prompt, nfc=True, allowed_special=frozenset(SPECIAL_TOKENS))
        return list(prompt)

    def generate(self, ids: list[int], body: dict) -> tuple[str, str]:
        """(text, finish_reason): stops at the model's end-of-text, a stop token id or a stop string."""
        stops = body.get("stop") or []
        stops = [stops] if isinstance(stops, str) else stops
        stop_ids = [self.tok.eod_id, *body.get("stop_token_ids", [])]
        decode = self.tok.decode
        [out] = self.engine.generate([ids], [body.get("max_tokens", 16)], [stop_ids],
                                     stop_check=lambda i, new: any(s in decode(new) for s in stops),
                                     temperature=[body.get("temperature") or 0.0], seed=[body.get("seed") or 0])
        text = decode(out.tokens)
        hits = [(text.find(s), s) for s in stops if s in text]
        if hits:  # the text ends at the stop string (kept only with include_stop_str_in_output)
            at, stop = min(hits)
            return text[: at + len(stop) if body.get("include_stop_str_in_output") else at], "stop"
        return text, out.finish

    @torch.inference_mode()
    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """[T, vocab] fp32 log-probabilities of the token after each position."""
        logits = self.model(torch.tensor([ids], device=next(self.model.parameters()).device))[0]
        return logits.float().log_softmax(-1).cpu()


class OpenAIServer:
    """Started in a background thread with its own event loop; `url` ends in /v1."""

    def __init__(self, served: ServedModel, behaviour: Behaviour | None = None):
        self.served, self.behaviour = served, behaviour or Behaviour()
        self.rng = random.Random(self.behaviour.seed)
        self.failures = self.answered = 0
        self.url = ""

    # ---- lifecycle --------------------------------------------------------------------------------------
    def __enter__(self) -> OpenAIServer:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner, port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    def __exit__(self, *exc) -> None:
        self.behaviour.hang_after = None  # a hanging handler ends, so the server can close
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)

    async def _start(self):
        app = web.Application(middlewares=[self._gate])
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)  # the OS picks a free port
        await site.start()
        return runner, runner.addresses[0][1]

    @web.middleware
    async def _gate(self, request: web.Request, handler):
        b = self.behaviour
        if b.key and request.headers.get("Authorization") != f"Bearer {b.key}":
            return _error(401, "invalid API key")
        if request.method == "POST" and self.failures < b.max_failures and self.rng.random() < b.failure_rate:
            self.failures += 1
            return _error(self.rng.choice((429, 500)), "busy")
        while request.method == "POST" and b.hang_after is not None and self.answered >= b.hang_after:
            await asyncio.sleep(0.05)  # no answer until the test lifts hang_after
        response = await handler(request)
        self.answered += request.method == "POST"
        return response

    # ---- endpoints ----------------------------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.served.name, "object": "model", "created": int(time.time()), "owned_by": "qwen-eval-tests",
             "max_model_len": self.served.model.args.max_position}]})

    async def completions(self, request: web.Request) -> web.Response:
        body = await request.json()
        top = body.get("logprobs")
        if top is not None and (top > self.behaviour.max_logprobs or not self.behaviour.max_logprobs):
            return _error(400, f"logprobs {top} exceeds the maximum {self.behaviour.max_logprobs}")
        if body.get("echo") and not self.behaviour.echo:
            return _error(400, "echo is not supported")
        prompt = body["prompt"]
        prompts = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], (list, str)) else [prompt]
        choices = [self._completion(i, self.served.encode_prompt(p), body) for i, p in enumerate(prompts)]
        return web.json_response({"id": "cmpl-test", "object": "text_completion", "model": self.served.name,
                                  "choices": choices})

    def _completion(self, index: int, ids: list[int], body: dict) -> dict:
        text, finish = self.served.generate(ids, body)
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        if body.get("logprobs") is not None:
            choice["logprobs"] = self._logprobs(ids, text, body["logprobs"], bool(body.get("echo")))
        if body.get("echo"):
            choice["text"] = self.served.tok.decode(ids) + text
        return choice

    def _logprobs(self, ids: list[int], text: str, top: int, echo: bool) -> dict:
        """OpenAI's legacy shape: per token its text, its log-probability and the top ones (the first prompt
        token has none); the rows are those of one forward over the prompt, as a server's prefill."""
        table = self.served.logprobs(ids)  # row t: the distribution of token t + 1
        sequence = ids + self.served.tok.encode(text)[:1]  # the first generated token is all the tests ask about
        decode = self.served.tok.decode
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
        for t in range(0 if echo else len(ids), max(len(sequence), len(ids) + 1)):
            row = table[t - 1] if t else None
            if t < len(sequence):
                out["tokens"].append(decode([sequence[t]]))
                out["token_logprobs"].append(None if row is None else float(row[sequence[t]]))
            if row is None:
                out["top_logprobs"].append(None)
                continue
            values, tokens = row.topk(top)
            out["top_logprobs"].append({decode([i]): float(v) for v, i in zip(values.tolist(), tokens.tolist())})
        return out

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        rendered = "".join(CHATML_TURN.format(**m) for m in body["messages"]) + "<|im_start|>assistant\n"
        text, finish = self.served.generate(self.served.encode_prompt(rendered), body)
        return web.json_response({"id": "chatcmpl-test", "object": "chat.completion", "model": self.served.name,
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                               "finish_reason": finish}]})


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "code": status}}, status=status)
