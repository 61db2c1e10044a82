"""Long-context perplexity on arXiv papers: the README / tech-memo table of Qwen-7B (spec sections 5 and 8.5).

Qwen-7B (original, trained at 2048) reported, one row per trick switched on:
                                1024   2048   4096    8192     16384
    none                        4.23   3.78   39.35   469.81   2645.09
    dynamic_ntk                 4.23   3.78    3.59     3.66      5.71
    dynamic_ntk+logn            4.23   3.78    3.58     3.56      4.62
    dynamic_ntk+logn+window     4.23   3.78    3.58     3.49      4.32
No script, subset or averaging rule was released. Here: every *.txt under ROOT/longctx_arxiv/ (any depth;
other files, e.g. LooGLE's jsonl, are ignored) is one document, tokenized with raw tiktoken (no NFC) and cut
into non-overlapping samples of each length L starting at multiples of L (an incomplete tail is dropped).
Each sample is scored once per row; a cell is exp(summed NLL / summed predicted tokens) over all samples of
that length (token-weighted; a sample predicts its L-1 last tokens).
"""
from __future__ import annotations

import math
from pathlib import Path

from ..api import Doc, LoglikelihoodRequest, Option, PerplexityScores, Scores, Table, Task, UserError, comma_integers
from ..data import DataSource

SOURCE_DIR = "longctx_arxiv"
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384)
ROWS = ("none", "dynamic_ntk", "dynamic_ntk+logn", "dynamic_ntk+logn+window")


def row_switches(window_attn: str) -> dict[str, tuple[tuple[str, object], ...]]:
    """Every row sets all three switches, so the checkpoint's own config never leaks into a row."""
    def switches(ntk: bool, logn: bool, window: str):
        return (("dynamic_ntk", ntk), ("logn", logn), ("window_attn", window))

    return dict(zip(ROWS, (switches(False, False, "none"), switches(True, False, "none"),
                           switches(True, True, "none"), switches(True, True, window_attn))))


def sample_starts(n_tokens: int, length: int) -> range:
    """Starts of the complete non-overlapping samples: multiples of `length` from the document start."""
    return range(0, n_tokens - length + 1, length)


def find_documents(data: DataSource) -> dict[str, Path]:
    """Document name (path under longctx_arxiv/ without ".txt") -> file, for every plain-text file."""
    if data.root is None:
        raise UserError("long_ppl has no hub source: pass --data-dir ROOT with plain-text documents (*.txt, "
                        f"any depth) under ROOT/{SOURCE_DIR}/")
    root = data.path(SOURCE_DIR, what="plain-text arXiv documents")
    documents = {p.relative_to(root).with_suffix("").as_posix(): p for p in sorted(root.rglob("*.txt")) if p.is_file()}
    if not documents:
        raise UserError(f"{root}: no plain-text documents (*.txt)")
    return documents


class LongPPL(Task):
    name, version = "long_ppl", "arxiv-2023-08"
    modes = ("fewshot",)  # a base-model measurement; "fewshot" is the runner's base-model mode
    sets_switches = True  # each row sets all three switches per request
    option_names = ("window_attn",)  # --window-attn: the windows of the "window" rows, not a run switch
    options = (Option("lengths", "long_ppl sample lengths in tokens, e.g. 1024,2048,4096,8192,16384 (the default)",
                      comma_integers, metavar="N,N,..."),)

    def __init__(self, documents: dict[str, Path] | None = None, tok=None, lengths=DEFAULT_LENGTHS):
        self.documents, self.tok, self.lengths = documents, tok, tuple(lengths)
        self.tokens: dict[str, list[int]] = {}  # filled by load; requests slice samples from it

    def bind(self, data: DataSource, tok, options: dict) -> "LongPPL":
        """This task over one data directory: its documents are the subjects, cut with this tokenizer."""
        lengths = tuple(options.get("lengths", DEFAULT_LENGTHS))
        if min(lengths) < 2 or len(set(lengths)) < len(lengths):
            raise UserError(f"long_ppl lengths {lengths}: need distinct lengths of at least 2 tokens")
        return LongPPL(find_documents(data), tok, lengths)

    @property
    def subjects(self) -> list[str]:
        return sorted(self.documents or ())

    def paired_scores(self, mode: str) -> PerplexityScores:
        return PerplexityScores(lambda record: tuple(row for row in ROWS if row in record["rows"]),
                                lambda record, row: (record["rows"][row]["nll"], record["rows"][row]["n_tokens"]),
                                lambda record: record["length"])

    def plot(self, results: dict, run_dir: Path) -> list[Path]:
        from ..plots import plot_perplexity

        return [plot_perplexity(results, run_dir / "perplexity.png")]

    def load(self, data: DataSource, mode: str, subjects: list[str] | None = None) -> list[Doc]:
        """Sample documents, ordered per document by sample index, then length: `--limit N` keeps the
        first samples of every length rather than all samples of the shortest."""
        if self.documents is None:
            raise UserError("long_ppl: no documents bound; plan_task calls bind(data, tok, options) first")
        docs = []
        for name in subjects or self.subjects:
            ids = self.tokens[name] = self.tok.encode(data.read_text(self.documents[name]))  # raw tiktoken
            starts = {length: sample_starts(len(ids), length) for length in self.lengths}
            for index in range(max(map(len, starts.values()))):
                docs += [Doc(f"{self.name}/{name}/{length}/{index}",
                             {"document": name, "length": length, "sample": index, "start": s[index]}, name)
                         for length, s in starts.items() if index < len(s)]
        longest = max(map(len, (self.tokens[name] for name in subjects or self.subjects)))
        too_long = [length for length in self.lengths if length > longest]
        if too_long:  # a length no document reaches would be an empty column
            raise UserError(f"--lengths {','.join(map(str, too_long))}: longer than every long_ppl document "
                            f"(the longest has {longest} tokens)")
        return docs

    def requests(self, doc: Doc, tok, mode: str, options: dict) -> list[LoglikelihoodRequest]:
        start, length = doc.data["start"], doc.data["length"]
        ids = tuple(self.tokens[doc.data["document"]][start: start + length])
        return [LoglikelihoodRequest(f"{doc.doc_id} [{row}]", ids, switches)
                for row, switches in row_switches(options.get("window_attn", "auto")).items()]

    def score(self, doc: Doc, responses: list, mode: str, options: dict) -> dict:
        return {"length": doc.data["length"],
                "rows": {row: {"nll": r.nll, "n_tokens": r.n_tokens} for row, r in zip(ROWS, responses)}}

    def aggregate(self, docs: list[Doc], records: list[dict], mode: str, options: dict) -> Scores:
        lengths = list(options.get("lengths", DEFAULT_LENGTHS))
        nll = {row: dict.fromkeys(lengths, 0.0) for row in ROWS}
        predicted = {row: dict.fromkeys(lengths, 0) for row in ROWS}
        samples = dict.fromkeys(lengths, 0)
        for record in records:
            samples[record["length"]] += 1
            for row, r in record["rows"].items():
                nll[row][record["length"]] += r["nll"]
                predicted[row][record["length"]] += r["n_tokens"]
        ppl = {row: {n: math.exp(nll[row][n] / predicted[row][n]) if predicted[row][n] else None for n in lengths}
               for row in ROWS}
        window = options.get("window_attn", "auto")
        table = Table(["switches", *map(str, lengths)])
        for row in ROWS:
            label = f"{row} ({window})" if row.endswith("window") else row
            table.rows.append([label] + [None if x is None else round(x, 2) for x in ppl[row].values()])
        table.rows.append(["samples"] + [samples[n] for n in lengths])
        metrics = {f"ppl_{row}_{n}": x for row in ROWS for n, x in ppl[row].items() if x is not None}
        extra = {"averaging": "exp(sum NLL / sum predicted tokens) over all samples of a length",
                 "window_attn": window, "samples": samples, "ppl": ppl, "nll": nll, "predicted_tokens": predicted}
        return Scores(metrics, table, extra)


TASK = LongPPL()
