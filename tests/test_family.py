"""The Qwen (v1) family: every size's published config reads to its shapes, and tiny random checkpoints of
each flavour (vocabulary padding, rotary base, switches, training length) load from both layouts, BF16 and
GPTQ Int4, to the logits of an independent implementation (transformers' Qwen2; the dequantized model)."""
import json

import pytest
import torch
from checkpoints import tiny_model, write_checkpoint
from test_gptq import dequantized_reference, write_gptq_checkpoint

from model import load_model
from model.config import args_from_config
from model.convert import to_transformers

torch.set_grad_enabled(False)

# config.json of each release, the keys that differ between sizes (EVALUATION.md, "The Qwen family", cites
# where each was read). Qwen-7B v1.1 for comparison: 4096 / 32 / 32, 22016, 151936, seq_length 8192, base 1e4.
PUBLISHED = {
    "Qwen-1_8B": {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16, "kv_channels": 128,
                  "intermediate_size": 11008, "vocab_size": 151936, "seq_length": 8192,
                  "max_position_embeddings": 8192, "rotary_emb_base": 10000, "use_dynamic_ntk": True,
                  "use_logn_attn": True},
    "Qwen-14B": {"hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40, "kv_channels": 128,
                 "intermediate_size": 27392, "vocab_size": 152064, "seq_length": 2048,
                 "max_position_embeddings": 8192, "rotary_emb_base": 10000, "use_dynamic_ntk": True,
                 "use_logn_attn": True},
    "Qwen-72B": {"hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64, "kv_channels": 128,
                 "intermediate_size": 49152, "vocab_size": 152064, "seq_length": 32768,
                 "max_position_embeddings": 32768, "rotary_emb_base": 1000000, "rope_theta": 1000000,
                 "use_dynamic_ntk": False, "use_logn_attn": False},
}
COMMON = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen", "layer_norm_epsilon": 1e-6, "rotary_pct": 1.0,
          "no_bias": True, "tie_word_embeddings": False}


@pytest.mark.parametrize("name,shape", [
    ("Qwen-1_8B", (2048, 24, 16, 128, 5504, 151936, 8192, 10000, True)),
    ("Qwen-14B", (5120, 40, 40, 128, 13696, 152064, 2048, 10000, True)),
    ("Qwen-72B", (8192, 80, 64, 128, 24576, 152064, 32768, 1000000, False)),
])
def test_published_configs_give_each_sizes_shapes(name, shape):
    a = args_from_config({**COMMON, **PUBLISHED[name]}, name)
    assert (a.dim, a.n_layer, a.n_head, a.head_dim, a.intermediate_size, a.vocab_size, a.seq_length,
            a.rope_base, a.use_dynamic_ntk) == shape
    assert a.use_logn_attn == a.use_dynamic_ntk  # both on, or (72B) both off


# Tiny models with each size's distinguishing settings; the real vocabulary paddings, so a real token id fits.
SWITCHES_ON = {"use_dynamic_ntk": True, "use_logn_attn": True}
FLAVOURS = {
    "1.8B": {"vocab_size": 151936, "rope_base": 10000.0, "seq_length": 8192, **SWITCHES_ON},
    "14B": {"vocab_size": 152064, "rope_base": 10000.0, "seq_length": 2048, **SWITCHES_ON},
    "72B": {"vocab_size": 152064, "rope_base": 1e6, "seq_length": 32768, "max_position": 32768,
            "use_dynamic_ntk": False, "use_logn_attn": False},
}


def flavour(name: str, seed: int = 4):
    return tiny_model(seed=seed, **FLAVOURS[name])  # dim 64, 4 heads, MLP 96: GPTQ groups of 32 fit


def tokens(vocab: int):
    ids = torch.randint(0, 151851, (2, 23), generator=torch.Generator().manual_seed(1))
    ids[0, -1] = vocab - 1  # a padding row of the embedding: the last id the checkpoint holds
    return ids


@pytest.mark.parametrize("fmt", ["original", "v1.1"])
@pytest.mark.parametrize("name", list(FLAVOURS))
def test_each_flavour_loads_from_both_layouts_to_the_logits_of_transformers(name, fmt, tmp_path):
    model = flavour(name)
    loaded = load_model(write_checkpoint(model, tmp_path / name, fmt), dtype="fp32", device="cpu")
    assert loaded.args == model.args  # shapes, padding, rotary base, switches and seq_length from the checkpoint
    ids = tokens(model.args.vocab_size)
    reference = to_transformers(loaded)(input_ids=ids).logits  # rope_theta = the checkpoint's rotary base
    assert (loaded(ids) - reference).abs().max().item() < 1e-4


def test_the_rotary_base_is_read_not_assumed(tmp_path):
    """72B's base 1e6 against the same weights at 1e4: a 7B default would give other logits."""
    model = flavour("72B")
    loaded = load_model(write_checkpoint(model, tmp_path / "72b", "v1.1"), dtype="fp32", device="cpu")
    assert loaded.args.rope_base == 1e6
    other = flavour("72B")
    other.args = type(other.args)(**{**vars(other.args), "rope_base": 10000.0})
    ids = tokens(152064)
    assert not torch.allclose(loaded(ids), other(ids), atol=1e-3)


@pytest.mark.parametrize("name", ["14B", "72B"])
def test_int4_flavours_equal_their_dequantized_model(name, tmp_path):
    model = flavour(name)
    expected = write_gptq_checkpoint(model, tmp_path / name, desc_act=False)
    loaded = load_model(tmp_path / name, dtype="fp32", device="cpu")
    assert (loaded.args.vocab_size, loaded.args.rope_base, loaded.args.use_dynamic_ntk) == (
        FLAVOURS[name]["vocab_size"], FLAVOURS[name]["rope_base"], FLAVOURS[name]["use_dynamic_ntk"])
    reference = dequantized_reference(tmp_path / name, expected, model.args)
    ids = tokens(model.args.vocab_size)
    assert (loaded(ids) - reference(ids)).abs().max().item() < 1e-4


def test_v11_config_keys_round_trip_for_every_flavour():
    from checkpoints import original_config, v11_config

    for name in FLAVOURS:
        args = flavour(name).args
        for config in (original_config(args), v11_config(args)):
            assert args_from_config(json.loads(json.dumps(config))) == args


# ---- the published tables of each size, and the report's choice of table by the recorded shape ---------
def test_every_family_row_has_a_task_or_a_reason_and_each_table_a_source():
    from eval import published
    from eval.registry import task_names

    for size, tables in published.FAMILY.items():
        for table in tables:
            assert table.size == size and table.source.startswith(published.README_REV) and table.rows
            for row in table.rows:
                assert row.task in (None, *task_names()) and (row.task or row.note)
    base_14b = {row.label: row.reported for row in published.FAMILY["14B"][0].rows}
    assert (base_14b["MMLU 5-shot"], base_14b["C-Eval 5-shot"], base_14b["GSM8K 8-shot"]) == (66.3, 72.1, 61.3)
    chat_72b = {row.label: (row.reported, row.model) for row in published.FAMILY["72B"][1].rows}
    assert chat_72b["Int4 MMLU"] == (73.4, "Qwen-72B-Chat-Int4") and chat_72b["HumanEval"] == (64.6, "")


def test_suites_per_size_and_mode_run_that_sizes_model():
    from eval.suites import SUITES

    for size in ("1.8b", "14b", "72b"):
        base, chat = SUITES[f"qwen-{size}-base"], SUITES[f"qwen-{size}-chat"]
        assert [e.task for e in base] == ["mmlu", "ceval", "cmmlu", "gsm8k", "humaneval"]
        assert {e.mode for e in base} == {"fewshot"} and {e.mode for e in chat} == {"chat"}
        assert "tooluse" in [e.task for e in chat]
        assert all(e.model.lower() == f"qwen/qwen-{size.replace('.', '_')}" + ("-chat" if e in chat else "")
                   for e in base + chat)
        assert next(e for e in chat if e.task == "ceval").flags == {}  # November 2023 numbers: default rules


SHAPES = {"7B": {"dim": 4096, "n_layer": 32, "n_head": 32, "intermediate_size": 11008, "vocab_size": 151936},
          "14B": {"dim": 5120, "n_layer": 40, "n_head": 40, "intermediate_size": 13696, "vocab_size": 152064}}


def mmlu_run(root, folder: str, shape: dict | None, correct: int):
    import fixtures

    records = [{"doc_id": f"mmlu/anatomy/{i}", "subject": "anatomy", "correct": i < correct,
                "correct_parity": i < correct, "correct_word_bounded": i < correct, "tie": False,
                "truncated": False, "rule": "regex1"} for i in range(100)]
    identity = {"shape": shape} if shape else {}
    return fixtures.write_run(root / folder / "mmlu-fewshot", "mmlu", "fewshot", records, identity=identity)


def section(text: str, title: str) -> str:
    return next(part for part in text.split("\n## ") if part.startswith(title))


def measured(text: str, title: str, label: str) -> list[str]:
    line = next(line for line in section(text, title).splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_a_14b_checkpoint_in_a_7b_folder_is_reported_as_14b(tmp_path, capsys):
    from eval.runner import main

    mmlu_run(tmp_path, "Qwen-7B", SHAPES["14B"], correct=66)  # named 7B, shaped 14B
    assert main(["report", str(tmp_path), "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert measured(text, "Qwen-14B base model", "MMLU 5-shot")[2:4] == ["66.3", "66.00"]
    assert measured(text, "Qwen-7B (original) base model", "MMLU 5-shot")[3] == "not run"  # never 7B's table
    assert "| `Qwen-7B/mmlu-fewshot` | mmlu | fewshot | Qwen-7B | 100 of 100 | yes | 14B |" in text


def test_7b_runs_keep_the_7b_tables_and_unsized_runs_show_as_unknown(tmp_path, capsys):
    from eval.runner import main

    mmlu_run(tmp_path, "Qwen-7B", SHAPES["7B"], correct=57)
    mmlu_run(tmp_path, "tiny", None, correct=10)
    assert main(["report", str(tmp_path), "--no-plots"]) == 0
    text = capsys.readouterr().out
    row = measured(text, "Qwen-7B (original) base model", "MMLU 5-shot")
    assert row[3] == "57.00" and row[7] == "`Qwen-7B/mmlu-fewshot`"
    assert "Qwen-14B base model" not in text  # no 14B run: no 14B tables
    assert "| `tiny/mmlu-fewshot` | mmlu | fewshot | tiny | 100 of 100 | no | unknown |" in text
