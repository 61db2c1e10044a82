"""Tensor parallel on CPU (gloo, two processes): the logits of one process to fp32 tolerance, the same greedy
tokens and choice answers, each rank holding half of every split weight and reading only its slices."""
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from checkpoints import tiny_model, write_checkpoint
from fixtures import find_run
from test_distributed import finished, torchrun

from eval.runner import main
from model import load_model
from model.engine import Engine
from model.tensor_parallel import Group, cut, init_groups, load_tensor_parallel, slices

torch.set_grad_enabled(False)
VOCAB = 512
PROMPTS = [[5, 17, 99, 3, 250, 7, 8], [400, 2, 2, 31], [9] * 19]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def inputs():
    ids = torch.randint(0, VOCAB, (3, 21), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # a left-padded row
    return ids, mask


def serve(model) -> dict:
    """What a TP group must agree on with one process: logits, greedy tokens, choice scores."""
    ids, mask = inputs()
    engine = Engine(model, progress=False)
    generated = engine.generate(PROMPTS, [12, 12, 12], [[], [], []])
    choices = engine.score_choices(PROMPTS, [[1, 2, 3, 300]] * 3)
    return {"logits": model(ids, mask), "tokens": [g.tokens for g in generated],
            "choice_logits": [c.logits for c in choices], "top": [c.top_id for c in choices],
            "numel": sum(p.numel() for p in model.parameters())}


def worker(rank: int, size: int, port: int, ckpt: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    layout = init_groups(size, cuda=False)
    model = load_tensor_parallel(ckpt, layout.tp, dtype="fp32", device="cpu")
    result = serve(model)
    result["fingerprint"] = model.weights_fingerprint
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=11, vocab_size=VOCAB, n_layer=2, use_dynamic_ntk=True, use_logn_attn=True)


@pytest.mark.slow  # two spawned processes each import torch and serve: half a minute or more on 2 cores
@pytest.mark.parametrize("fmt", ["v1.1", "original"])  # safetensors slices, and a memory-mapped .bin
def test_two_ranks_give_the_logits_and_tokens_of_one_process(model, fmt, tmp_path):
    ckpt = write_checkpoint(model, tmp_path / "ckpt", fmt)
    one = serve(load_model(ckpt, dtype="fp32", device="cpu"))
    mp.spawn(worker, args=(2, free_port(), str(ckpt), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    norms = sum(p.numel() for n, p in model.named_parameters() if ".ln_" in n)
    for tp in ranks:
        assert (tp["logits"] - one["logits"]).abs().max().item() < 1e-4
        assert tp["tokens"] == one["tokens"]
        assert tp["top"] == one["top"]
        assert torch.allclose(torch.tensor(tp["choice_logits"]), torch.tensor(one["choice_logits"]), atol=1e-4)
        assert tp["numel"] == (one["numel"] - norms) // 2 + norms  # half of every split weight, the norms whole
    assert torch.equal(ranks[0]["logits"], ranks[1]["logits"])  # rank order: the same bits everywhere
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]


def test_slices_keep_whole_heads_of_q_k_and_v():
    g = Group(rank=1, size=2)
    qkv = torch.arange(12 * 3)[:, None].repeat(1, 2)  # 12 = 4 heads x head_dim 3, stacked q, k, v
    kept = cut(qkv, slices("transformer.h.0.attn.c_attn.weight", (36, 2), g, head_dim=3))[:, 0].tolist()
    assert kept == [6, 7, 8, 9, 10, 11, 18, 19, 20, 21, 22, 23, 30, 31, 32, 33, 34, 35]  # heads 2, 3 of each
    proj = slices("transformer.h.0.attn.c_proj.weight", (12, 12), g, head_dim=3)
    assert proj == (1, [(6, 12)])  # the matching input columns
    assert slices("transformer.h.0.ln_1.weight", (12,), g, 3) is None
    assert slices("lm_head.weight", (152064, 8), Group(rank=3, size=8), 3) == (0, [(57024, 76032)])


# ---- through the CLI: tensor parallel alone, and composed with data parallel ------------------------------
def predictions(run_dir: Path) -> list:
    return [(r["doc_id"], r["pred"]) for r in map(json.loads, (run_dir / "samples.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("processes", [2, 4])  # TP 2 x DP 1, TP 2 x DP 2
def test_cli_tensor_parallel_scores_as_one_process(processes, tiny_checkpoint, data_root, tmp_path):
    common = ["--task", "mmlu", "--subjects", "anatomy,astronomy", "--model", tiny_checkpoint, "--data-dir",
              data_root, "--no-progress"]
    assert main([str(a) for a in common + ["--output-dir", tmp_path / "one"]]) == 0
    code, out = finished(torchrun(processes, common + ["--output-dir", tmp_path / "tp", "--tensor-parallel", 2]),
                         timeout=300)
    assert code == 0, out
    one, tp = (find_run(tmp_path / d, "mmlu-fewshot-fp32") for d in ("one", "tp"))
    assert predictions(tp) == predictions(one)
    results = json.loads((tp / "results.json").read_text())
    assert results["identity"]["tensor_parallel"] == 2 and results["config"].get("world_size", 1) == processes // 2
    assert results["metrics"] == json.loads((one / "results.json").read_text())["metrics"]


def test_tensor_parallel_without_torchrun_is_refused_before_loading(tiny_checkpoint, data_root, tmp_path, capsys):
    code = main([str(a) for a in ["--task", "mmlu", "--model", tiny_checkpoint, "--data-dir", data_root,
                                  "--output-dir", tmp_path, "--tensor-parallel", 2]])
    assert code == 2 and "--tensor-parallel 2 needs a multiple of 2 processes" in capsys.readouterr().err
