"""Speed and memory profile: the README table of tokens/s and peak GPU memory at batch 1.

Generating 2048 and 8192 tokens from 1 context token, and encoding 2048 tokens. Reported for Qwen-7B
BF16 on an A100-SXM4-80G with PyTorch 2.0.1 (2023-09 revision): 30.34 / 29.32 tokens/s, peak memory
17.66 GB (encode 2048) / 22.58 GB (generate 8192); Int4 43.56 / 33.92 tokens/s, 8.21 / 13.62 GB.
Timings follow the hardware: compare them only within one machine and one run.
"""
from ..api import Doc, GenerateRequest, LoglikelihoodRequest, Scores, Table, Task
from ..published import reported


class Profile(Task):
    name, version = "profile", "1"
    modes = ("fewshot", "chat")
    timed = True  # served one request at a time, timed, instead of batched

    def serve(self, backend, requests: list, on_done=None) -> list:
        from ..backends import profile  # torch: imported when a profile run serves, never by the task's module

        return profile(backend, requests, on_done)

    def load(self, data, mode: str, subjects=None) -> list[Doc]:
        return [Doc(f"profile/{kind}/{n}", {"kind": kind, "tokens": n}) for kind, n in
                (("generate", 2048), ("generate", 8192), ("encode", 2048))]

    def requests(self, doc: Doc, tok, mode: str, options: dict) -> list:
        n = doc.data["tokens"]
        if doc.data["kind"] == "generate":  # one context token, no stop: exactly n new tokens
            return [GenerateRequest("<|endoftext|>", (tok.eod_id,), n)]
        tokens = tuple(tok.encode(" ".join(f"word{i % 1000}" for i in range(n)))[:n])  # any n ordinary tokens
        return [LoglikelihoodRequest(f"{n} tokens", tokens)]

    def score(self, doc: Doc, responses: list, mode: str, options: dict) -> dict:
        r = responses[0]
        return {"seconds": round(r.seconds, 3), "tokens": r.tokens, "tokens_per_s": round(r.tokens / r.seconds, 2),
                "peak_memory_gb": None if r.peak_memory_gb is None else round(r.peak_memory_gb, 2)}

    def aggregate(self, docs: list[Doc], records: list[dict], mode: str, options: dict) -> Scores:
        table = Table(["measurement", "tokens/s", "peak GB", "reported tokens/s", "reported peak GB"])
        metrics = {}
        for doc, rec in zip(docs, records):
            key = doc.doc_id.removeprefix("profile/")
            speed = rec["tokens_per_s"] if doc.data["kind"] == "generate" else "-"
            published = (reported(self.name, mode, f"{key} {unit}") for unit in ("tokens_per_s", "peak_gb"))
            peak = "-" if rec["peak_memory_gb"] is None else rec["peak_memory_gb"]
            table.rows.append([key, speed, peak, *(x if x is not None else "-" for x in published)])
            metrics[f"{key} peak_gb"] = rec["peak_memory_gb"]
            if doc.data["kind"] == "generate":
                metrics[f"{key} tokens_per_s"] = rec["tokens_per_s"]
        return Scores(metrics, table)


TASK = Profile()
