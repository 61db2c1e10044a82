"""--backend api: a served model behind an OpenAI-compatible endpoint (vLLM, SGLang, a gateway).

The prompts are the native path's own: few-shot prompts go to /v1/completions as the very token ids the
native backend would feed its model (NFC, truncation and shared prefixes included), chat prompts go to
/v1/chat/completions as the messages of the ChatML the native path built (system prompt included; the
server's chat template must render ChatML). Stop strings, stop tokens and token limits are the requests'
own; the tasks extract and score the replies exactly as for the native backend.

Per request kind:
- choice: the top-k log-probabilities of the next token (completions, `logprobs`); a choice outside the
  top k is scored from the echoed log-probability of prompt + choice token (`echo`). The records' `logits`
  are then log-probabilities: the logits shifted by one constant per question, so predictions, ties and
  the parity probabilities are those of the logits. Without log-probabilities the task falls back to
  generate-and-extract (one greedy token compared with the choice tokens), said on the terminal and in
  run.json.
- generate: greedy (or seeded sampling) completions, cut at the request's stop rules.
- loglikelihood: the echoed log-probabilities of the prompt's own tokens; without echo the task cannot run.

Requests run `--concurrency` at a time; 429, 5xx, dropped connections and timeouts are retried with
exponential backoff (urllib3). The key is read from the environment variable named by --api-key-env and
only ever sent in the Authorization header.
"""
from __future__ import annotations

import math
import os
import re
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from .api import (ChoiceRequest, ChoiceResponse, GenerateRequest, GenerateResponse, LoglikelihoodRequest,
                  LoglikelihoodResponse, UserError)
from .cli_checks import did_you_mean

TOP_LOGPROBS = (20, 5, 1)  # asked for in this order: vLLM's default ceiling, OpenAI's, the least
RETRY_STATUSES = (429, 500, 502, 503, 504)
RETRIES = 8
BACKOFF = 0.5  # seconds; doubled per retry (the first retry is immediate), with as much jitter
READ_TIMEOUT = 600.0  # seconds for one reply: a long generation on a busy server
PROBE_PROMPT = [16, 17, 18]  # any few token ids: the probe asks what the endpoint returns, not what it says
TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>\n?", re.DOTALL)
ASSISTANT_CUE = "<|im_start|>assistant\n"


class EndpointError(UserError):
    """The endpoint is unreachable, rejects the key or a request: one line, exit code 2."""


# ---- HTTP ---------------------------------------------------------------------------------------------
class Client:
    """JSON over one pooled requests session with retries; errors become one-line EndpointErrors."""

    def __init__(self, base_url: str, key: str | None, *, connections: int = 1, retries: int = RETRIES,
                 backoff: float = BACKOFF, read_timeout: float = READ_TIMEOUT):
        self.base_url = base_url.rstrip("/")
        self.timeout = (10.0, read_timeout)
        retry = Retry(total=retries, connect=retries, read=retries, status=retries, other=0, redirect=0,
                      status_forcelist=RETRY_STATUSES, allowed_methods=None, backoff_factor=backoff,
                      backoff_jitter=backoff, raise_on_status=False)
        self.session = requests.Session()
        self.session.mount(self.base_url, HTTPAdapter(max_retries=retry, pool_maxsize=connections))
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"

    def get(self, path: str) -> dict:
        return self._call("GET", path, None)

    def post(self, path: str, body: dict) -> dict:
        return self._call("POST", path, body)

    def _call(self, method: str, path: str, body: dict | None) -> dict:
        url = f"{self.base_url}/{path}"
        try:
            reply = self.session.request(method, url, json=body, timeout=self.timeout)
        except requests.exceptions.RequestException as err:
            raise EndpointError(f"--base-url {self.base_url}: no answer from {url} ({_reason(err)})") from None
        if reply.status_code in (401, 403):
            raise EndpointError(f"--base-url {self.base_url}: the endpoint rejected the key (HTTP "
                                f"{reply.status_code}); pass --api-key-env VAR naming the variable holding a valid key")
        if reply.status_code != 200:
            raise EndpointError(f"--base-url {self.base_url}: {method} {path} answered HTTP {reply.status_code}: "
                                f"{_message(reply)}")
        try:
            return reply.json()
        except ValueError:
            raise EndpointError(f"--base-url {self.base_url}: {path} did not answer JSON") from None


def _reason(err: Exception) -> str:
    """The innermost cause of a connection failure, without the pool's repr noise."""
    text = str(err.args[0] if err.args else err)
    match = re.search(r"(\[Errno -?\d+\][^')\]]*|Read timed out|Connection refused|Max retries exceeded)", text)
    return match.group(1).strip() if match else type(err).__name__


def _message(reply: requests.Response) -> str:
    try:
        error = reply.json().get("error", reply.json())
        text = error.get("message", error) if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        text = reply.text
    return " ".join(str(text).split())[:300]


# ---- connecting ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Capabilities:
    top_logprobs: int  # how many next-token log-probabilities a completion returns (0: none)
    echo: bool  # whether it returns the prompt's own log-probabilities


@dataclass
class Endpoint:
    client: Client
    model: str  # the served model name sent with every request
    server: dict  # what /v1/models says about it (its stable fields)
    can: Capabilities
    concurrency: int

    def describe(self, plans) -> tuple[None, dict]:
        """The run identity known before any request (there is no checkpoint); refuses a task the endpoint
        cannot serve, and says on the terminal where a task is served differently from the native path."""
        for plan in plans:
            name = f"{plan.task.name} ({plan.mode})"
            kinds = {type(r) for requests in plan.requests for r in requests}
            if plan.task.timed:
                raise UserError(f"--task {plan.task.name} times this machine's device one request at a time: "
                                "use --backend native")
            if LoglikelihoodRequest in kinds and not self.can.echo:
                raise UserError(f"--task {plan.task.name} scores the log-probabilities of given text (echo), which "
                                f"{self.client.base_url} does not return: it cannot run with --backend api")
            if ChoiceRequest in kinds and not self.can.top_logprobs:
                print(f"{name}: the endpoint returns no log-probabilities: answers are generate-and-extract (one "
                      "greedy token compared with the choice letters), not the argmax of the choice logits")
            if any(getattr(r, "switches", ()) for requests in plan.requests for r in requests):
                print(f"{name}: a served model cannot switch dynamic NTK / LogN / windows per request: every "
                      "row measures the server's own configuration")
        return None, {"backend": "api", "dtype": "the server's", "switches": "the server's",
                      "endpoint": {"url": self.client.base_url, "model": self.model, "server": self.server,
                                   "served": self.served()}}

    def served(self) -> dict:
        """How each request kind is answered (recorded in run.json)."""
        choice = (f"logprobs (top {self.can.top_logprobs}" + (", echo for choices outside)" if self.can.echo else ")")
                  if self.can.top_logprobs else "generate-and-extract (no log-probabilities)")
        return {"choice": choice, "generate": "completions / chat completions",
                "loglikelihood": "echo" if self.can.echo else "unavailable (no echo)"}

    def backend(self, tokenizer, progress: bool = True) -> ApiBackend:
        return ApiBackend(self, tokenizer, progress=progress)

    def identity_after_load(self) -> dict:
        return {"model": None, "engine": "api"}  # the weights are the server's: not fingerprinted


def connect(options: dict, *, backoff: float = BACKOFF) -> Endpoint:
    """Reach the endpoint, check the key, pick the served model and ask what it returns: every failure is
    one line naming the flag at fault, before any work is planned. options: the run's api backend options
    (run_config.BACKEND_OPTIONS["api"])."""
    base_url, api_model, key_env = options["base_url"], options["api_model"], options["api_key_env"]
    key = None
    if key_env:
        key = os.environ.get(key_env)
        if not key:
            raise UserError(f"--api-key-env {key_env}: that environment variable is not set")
    check = Client(base_url, key, retries=1, backoff=0, read_timeout=30)  # fail fast: nothing is planned yet
    listed = check.get("models").get("data") or []
    names = [m.get("id") for m in listed if isinstance(m, dict)]
    if api_model and api_model not in names:
        raise UserError(f"--api-model {api_model}: not served by {base_url} (it serves "
                        f"{', '.join(map(str, names)) or 'nothing'}){did_you_mean(api_model, names)}")
    if not api_model and len(names) != 1:
        raise UserError(f"--base-url {base_url} serves {len(names)} models ({', '.join(map(str, names))}): "
                        "pass --api-model NAME")
    model = api_model or names[0]
    entry = next(m for m in listed if m.get("id") == model)
    client = Client(base_url, key, connections=options["concurrency"], backoff=backoff)
    return Endpoint(client, model, stable_fields(entry), probe(client, model), options["concurrency"])


def stable_fields(entry: dict) -> dict:
    """The /v1/models entry without what changes per request (vLLM's `created` time, permission ids)."""
    return {k: v for k, v in sorted(entry.items()) if k not in ("created", "permission")
            and (v is None or isinstance(v, (str, int, float, bool)))}


def probe(client: Client, model: str) -> Capabilities:
    """Ask for next-token log-probabilities and echo once; a 400 says the endpoint does not offer them."""
    base = {"model": model, "prompt": PROBE_PROMPT, "max_tokens": 1, "temperature": 0}
    for top in TOP_LOGPROBS:
        for echo in (True, False):
            try:
                reply = client.post("completions", {**base, "logprobs": top, **({"echo": True} if echo else {})})
            except EndpointError as err:
                if "HTTP 400" in str(err) or "HTTP 422" in str(err):
                    continue
                raise
            logprobs = reply["choices"][0].get("logprobs") or {}
            has_echo = echo and len(logprobs.get("token_logprobs") or []) > len(PROBE_PROMPT)
            if logprobs.get("top_logprobs"):
                return Capabilities(top, has_echo)
    client.post("completions", base)  # answers at all (a prompt of token ids)? else its one-line error
    return Capabilities(0, False)


# ---- the backend --------------------------------------------------------------------------------------
class ApiBackend:
    name = "api"
    label = ""  # shown first on the progress bar (the task being served)

    def __init__(self, endpoint: Endpoint, tokenizer, *, progress: bool = True):
        self.endpoint, self.tokenizer, self.progress = endpoint, tokenizer, progress
        self.client, self.can = endpoint.client, endpoint.can

    def choice(self, requests: list[ChoiceRequest], on_done=None) -> list[ChoiceResponse]:
        answer = self._choice if self.can.top_logprobs else self._choice_by_generation
        return self._map(answer, requests, on_done, "choice")

    def generate(self, requests: list[GenerateRequest], on_done=None) -> list[GenerateResponse]:
        return self._map(self._generate, requests, on_done, "generate")

    def loglikelihood(self, requests: list[LoglikelihoodRequest], on_done=None) -> list[LoglikelihoodResponse]:
        return self._map(self._loglikelihood, requests, on_done, "loglikelihood")

    def _map(self, answer, requests: list, on_done, kind: str) -> list:
        """answer(request) for every request, `concurrency` at a time; on_done hears of each as it lands."""
        from tqdm.auto import tqdm

        out: list = [None] * len(requests)
        bar = tqdm(total=len(requests), desc=f"{self.label} api {kind}".strip(), disable=not self.progress,
                   leave=False, dynamic_ncols=True)
        pool = ThreadPoolExecutor(self.endpoint.concurrency)
        try:
            futures = {pool.submit(self._checked, answer, r): i for i, r in enumerate(requests)}
            for future in as_completed(futures):
                i = futures[future]
                out[i] = future.result()
                if on_done:
                    on_done([(i, out[i])])
                bar.update()
        except BaseException:  # an error or Ctrl-C: no new request starts, and the partial table need not wait
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            bar.close()
        pool.shutdown()
        return out

    def _checked(self, answer, request):
        try:
            return answer(request)
        except (KeyError, IndexError, TypeError, AttributeError) as err:  # a reply of another shape
            raise EndpointError(f"--base-url {self.client.base_url}: a reply lacks the OpenAI field or entry "
                                f"{err} (see EVALUATION.md, 'A served model', for what each task needs)") from None

    def _completion(self, body: dict) -> dict:
        return self.client.post("completions", {"model": self.endpoint.model, "temperature": 0, **body})

    # -- choice -------------------------------------------------------------------------------------------
    def _choice(self, r: ChoiceRequest) -> ChoiceResponse:
        reply = self._completion({"prompt": list(r.tokens), "max_tokens": 1, "logprobs": self.can.top_logprobs})
        top = reply["choices"][0]["logprobs"]["top_logprobs"][0]  # {token: log-probability}
        found = {self._token_id(t, r.choice_ids): lp for t, lp in top.items()}
        missing = [c for c in r.choice_ids if c not in found]
        if missing and self.can.echo:
            found.update(self._echoed_choices(r.tokens, missing))
        # without echo a choice outside the top k is below all of them: -inf keeps the argmax exact
        values = tuple(float(found.get(c, -math.inf)) for c in r.choice_ids)
        best = max(top, key=top.get)
        parity = _softmax(tuple(math.exp(v) for v in values))  # the original's softmax of the probabilities
        return ChoiceResponse(values, parity, self._token_id(best, r.choice_ids) in r.choice_ids)

    def _echoed_choices(self, tokens: tuple[int, ...], choices: list[int]) -> dict[int, float]:
        """log p(choice | prompt) from the echoed log-probabilities of prompt + choice, one prompt per choice."""
        reply = self._completion({"prompt": [[*tokens, c] for c in choices], "max_tokens": 1, "logprobs": 1,
                                  "echo": True})
        rows = sorted(reply["choices"], key=lambda c: c.get("index", 0))
        return {c: row["logprobs"]["token_logprobs"][len(tokens)] for c, row in zip(choices, rows)}

    def _token_id(self, token: str, candidates: tuple[int, ...]) -> int | None:
        """A top-logprobs key as a token id: vLLM's "token_id:N" form, or the text of one of the candidates."""
        if token.startswith("token_id:"):
            return int(token.removeprefix("token_id:"))
        return next((c for c in candidates if self.tokenizer.decode([c]) == token), None)

    def _choice_by_generation(self, r: ChoiceRequest) -> ChoiceResponse:
        """No log-probabilities: one greedy token, matched with the choice tokens (1.0 for the match)."""
        text = self._completion({"prompt": list(r.tokens), "max_tokens": 1})["choices"][0]["text"]
        texts = [self.tokenizer.decode([c]) for c in r.choice_ids]
        hit = text if text in texts else next((t for t in texts if t.strip() and t.strip() == text.strip()), None)
        values = tuple(float(t == hit) for t in texts)
        return ChoiceResponse(values, values, hit is not None)

    # -- generation ---------------------------------------------------------------------------------------
    def _generate(self, r: GenerateRequest) -> GenerateResponse:
        body = {"model": self.endpoint.model, "max_tokens": r.max_new_tokens, "temperature": r.temperature}
        if r.temperature:
            body["seed"] = r.seed
        if r.stop_ids:
            body["stop_token_ids"] = list(r.stop_ids)  # vLLM / SGLang: e.g. <|im_end|> of a ChatML model
        if len(r.stop) == 1:  # any one string stops: the server may stop there (several groups: cut below)
            body.update(stop=list(r.stop[0]), include_stop_str_in_output=True)
        if r.query is None:
            reply = self.client.post("completions", {**body, "prompt": list(r.tokens)})["choices"][0]
            text = reply["text"]
        else:
            reply = self.client.post("chat/completions", {**body, "messages": chatml_messages(r.prompt)})["choices"][0]
            text = reply["message"].get("content") or ""
        cut = stop_rules_cut(r.stop, text)
        finish = "stop" if cut is not None or reply.get("finish_reason") == "stop" else "length"
        text = text if cut is None else text[:cut]
        return GenerateResponse(tuple(self.tokenizer.encode(text)), text, finish)  # ids re-encoded from the text

    # -- rolling log-likelihood ---------------------------------------------------------------------------
    def _loglikelihood(self, r: LoglikelihoodRequest) -> LoglikelihoodResponse:
        reply = self._completion({"prompt": list(r.tokens), "max_tokens": 1, "logprobs": 1, "echo": True})
        logprobs = reply["choices"][0]["logprobs"]["token_logprobs"][1: len(r.tokens)]  # the first has no context
        return LoglikelihoodResponse(-math.fsum(logprobs), len(r.tokens) - 1)


def chatml_messages(prompt: str) -> list[dict]:
    """The messages of a ChatML prompt built by the native path; refuses one that is not exactly
    turns + the assistant cue, since the server would then render another prompt."""
    turns = TURN.findall(prompt.removesuffix(ASSISTANT_CUE))
    rebuilt = "\n".join(f"<|im_start|>{role}\n{content}<|im_end|>" for role, content in turns) + "\n" + ASSISTANT_CUE
    if not turns or rebuilt != prompt:
        raise UserError(f"a chat prompt is not plain ChatML turns, so it has no messages form: {prompt[:80]!r}")
    return [{"role": role, "content": content} for role, content in turns]


def stop_rules_cut(groups: tuple[tuple[str, ...], ...], text: str) -> int | None:
    """Where the stop rules first hold (eval.backends.stop_rules_met on the shortest prefix): the end of the
    match that completes the last group, or None."""
    ends = []
    for group in groups:
        found = [text.find(s) + len(s) for s in group if s in text]
        if not found:
            return None
        ends.append(min(found))
    return max(ends) if ends else None


def _softmax(values: tuple[float, ...]) -> tuple[float, ...]:
    weights = [math.exp(v - max(values)) for v in values]
    return tuple(w / sum(weights) for w in weights)
