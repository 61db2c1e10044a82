"""The Qwen tokenizer: tiktoken BPE over qwen.tiktoken, 208 special tokens, ChatML (spec section 7, 6.8)."""
from __future__ import annotations

import base64
import unicodedata
from pathlib import Path

import tiktoken

PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END) + tuple(f"<|extra_{i}|>" for i in range(205))
FIRST_SPECIAL_ID = 151643
DEFAULT_SYSTEM = "You are a helpful assistant."


class TokenizerError(ValueError):
    """A vocabulary file that cannot be read; the message names the file and line."""


def _read_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    try:
        lines = path.read_bytes().splitlines()
    except OSError as err:
        raise TokenizerError(f"{path}: cannot read the vocabulary ({err.strerror})") from None
    for lineno, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise TokenizerError(f"{path}:{lineno}: expected 'base64-token rank'") from None
    if len(ranks) != FIRST_SPECIAL_ID:
        raise TokenizerError(f"{path}: {len(ranks)} tokens, expected {FIRST_SPECIAL_ID} (is this qwen.tiktoken?)")
    return ranks


class QwenTokenizer:
    eod_id = FIRST_SPECIAL_ID  # <|endoftext|>
    im_start_id = FIRST_SPECIAL_ID + 1
    im_end_id = FIRST_SPECIAL_ID + 2
    pad_id = FIRST_SPECIAL_ID + 3  # <|extra_0|>, the pad of the batched eval scripts

    def __init__(self, vocab_file: str | Path):
        self.vocab_file = Path(vocab_file)
        specials = {tok: FIRST_SPECIAL_ID + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding("qwen", pat_str=PAT_STR, mergeable_ranks=_read_ranks(self.vocab_file), special_tokens=specials)
        self.n_vocab = self.enc.n_vocab  # 151,851; the model pads its embedding to 151,936

    def encode(self, text: str, *, nfc: bool = False, allowed_special: frozenset[str] = frozenset()) -> list[int]:
        """Token ids. Special-token surface forms are plain text unless listed in allowed_special.

        nfc=True is the HF-wrapper path of the original (multiple choice, chat); base generation used
        raw tiktoken, without NFC.
        """
        if nfc:
            text = unicodedata.normalize("NFC", text)
        return self.enc.encode(text, allowed_special=set(allowed_special), disallowed_special=())

    def decode(self, ids, errors: str = "replace") -> str:
        """Text of token ids; ids of the padded embedding rows (151851..151935) have none and show as U+FFFD."""
        ids = list(ids)
        if all(i < self.n_vocab for i in ids):
            return self.enc.decode(ids, errors=errors)
        pieces, run = [], []
        for i in ids + [None]:
            if i is not None and i < self.n_vocab:
                run.append(i)
                continue
            pieces.append(self.enc.decode(run, errors=errors))
            run = []
            if i is not None:
                pieces.append("\ufffd")
        return "".join(pieces)

    def make_context(self, query: str, history=(), system: str = DEFAULT_SYSTEM, max_window_size: int = 6144):
        """ChatML prompt (raw_text, ids), each piece tokenized separately as the original (spec 6.8)."""
        nl = self.encode("\n")

        def turn(role: str, content: str) -> tuple[str, list[int]]:
            ids = [self.im_start_id] + self.encode(role, nfc=True) + nl + self.encode(content, nfc=True) + [self.im_end_id]
            return f"{IM_START}{role}\n{content}{IM_END}", ids

        system_text, system_ids = turn("system", system)
        history_text, history_ids = "", []
        for past_query, past_response in reversed(list(history)):  # newest first, while it fits
            q_text, q_ids = turn("user", past_query)
            r_text, r_ids = turn("assistant", past_response)
            ids = nl + q_ids + nl + r_ids
            if len(system_ids) + len(ids) + len(history_ids) >= max_window_size:
                break
            history_text, history_ids = f"\n{q_text}\n{r_text}" + history_text, ids + history_ids
        q_text, q_ids = turn("user", query)
        raw_text = f"{system_text}{history_text}\n{q_text}\n{IM_START}assistant\n"
        ids = system_ids + history_ids + nl + q_ids + nl + [self.im_start_id] + self.encode("assistant", nfc=True) + nl
        return raw_text, ids

    @property
    def chat_stop_ids(self) -> tuple[int, ...]:
        return (self.im_end_id, self.im_start_id, self.eod_id)
