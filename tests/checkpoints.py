"""Tiny random Qwen checkpoints written in both published on-disk formats, and the real vocabulary."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from model import ModelArgs, Qwen, init_weights

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def vocab_file() -> Path:
    """The real qwen.tiktoken: ../shared/qwen when present, else the copy shipped in dashscope==1.20.0."""
    shared = SHARED / "qwen" / "qwen.tiktoken"
    if shared.exists():
        return shared
    import dashscope

    return Path(dashscope.__file__).parent / "resources" / "qwen.tiktoken"


def tiny_args(**overrides) -> ModelArgs:
    base = dict(vocab_size=151936, dim=64, n_layer=2, n_head=4, head_dim=16, intermediate_size=96,
                seq_length=64, max_position=1024, use_dynamic_ntk=True, use_logn_attn=True)
    return ModelArgs(**{**base, **overrides})


def tiny_model(seed: int = 0, **overrides) -> Qwen:
    return init_weights(Qwen(tiny_args(**overrides)), std=0.2, seed=seed).eval().requires_grad_(False)


def original_config(args: ModelArgs) -> dict:
    """GPT-2 style keys of the original Qwen-7B release (FFN size stored doubled)."""
    return {
        "architectures": ["QWenLMHeadModel"], "model_type": "qwen", "n_embd": args.dim, "n_layer": args.n_layer,
        "n_head": args.n_head, "kv_channels": args.head_dim, "ffn_hidden_size": 2 * args.intermediate_size,
        "seq_length": args.seq_length, "n_positions": args.max_position, "padded_vocab_size": args.vocab_size,
        "vocab_size": args.vocab_size, "rotary_emb_base": args.rope_base, "rotary_pct": 1.0,
        "layer_norm_epsilon": args.norm_eps, "use_dynamic_ntk": args.use_dynamic_ntk,
        "use_logn_attn": args.use_logn_attn, "no_bias": True, "tie_word_embeddings": False,
    }


def v11_config(args: ModelArgs) -> dict:
    """HF-style keys of the v1.1 release."""
    return {
        "architectures": ["QWenLMHeadModel"], "model_type": "qwen", "hidden_size": args.dim,
        "num_hidden_layers": args.n_layer, "num_attention_heads": args.n_head, "kv_channels": args.head_dim,
        "intermediate_size": 2 * args.intermediate_size, "seq_length": args.seq_length,
        "max_position_embeddings": args.max_position, "vocab_size": args.vocab_size,
        "rotary_emb_base": args.rope_base, "rotary_pct": 1.0, "layer_norm_epsilon": args.norm_eps,
        "use_dynamic_ntk": args.use_dynamic_ntk, "use_logn_attn": args.use_logn_attn, "no_bias": True,
        "tie_word_embeddings": False,
    }


def write_checkpoint(model: Qwen, directory: Path, fmt: str = "original", shards: int = 2, dtype=torch.float32) -> Path:
    """fmt 'original': config with GPT-2 keys + pytorch_model.bin; 'v1.1': HF keys + sharded safetensors + index."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if fmt == "original":
        (directory / "config.json").write_text(json.dumps(original_config(model.args), indent=2))
        torch.save(state, directory / "pytorch_model.bin")
    elif fmt == "v1.1":
        (directory / "config.json").write_text(json.dumps(v11_config(model.args), indent=2))
        names = list(state)
        weight_map = {}
        for i in range(shards):
            part = names[i::shards]
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: state[n] for n in part}, directory / file, metadata={"format": "pt"})
            weight_map.update({n: file for n in part})
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    else:
        raise ValueError(fmt)
    shutil.copy(vocab_file(), directory / "qwen.tiktoken")
    return directory
