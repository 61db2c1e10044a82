"""Qwen (v1) weights as a `transformers` Qwen2 model: the independent reference and the `hf` baseline.

Qwen2 is the same network without dynamic NTK, LogN and windows: q/k/v split out of c_attn (with
their biases), gate = w2, up = w1, down = mlp.c_proj.
"""
from __future__ import annotations

import torch

from .config import ModelArgs

_RENAMES = {
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "ln_1.weight": "input_layernorm.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "mlp.w1.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.gate_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}


def qwen2_config(args: ModelArgs, **overrides):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.n_layer, num_attention_heads=args.n_head, num_key_value_heads=args.n_head,
        head_dim=args.head_dim, rms_norm_eps=args.norm_eps, rope_theta=args.rope_base,
        max_position_embeddings=max(args.max_position, 32768), tie_word_embeddings=False,
        bos_token_id=151643, eos_token_id=151643, **overrides,
    )


def qwen2_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Qwen v1 parameter names -> Qwen2 names (tensors are shared, not copied, except the q/k/v split)."""
    out = {"model.embed_tokens.weight": state["transformer.wte.weight"],
           "model.norm.weight": state["transformer.ln_f.weight"],
           "lm_head.weight": state["lm_head.weight"]}
    layers = {int(k.split(".")[2]) for k in state if k.startswith("transformer.h.")}
    for i in layers:
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        for name in ("weight", "bias"):
            q, k, v = state[src + f"attn.c_attn.{name}"].chunk(3, dim=0)
            out.update({dst + f"self_attn.q_proj.{name}": q, dst + f"self_attn.k_proj.{name}": k,
                        dst + f"self_attn.v_proj.{name}": v})
        out.update({dst + new: state[src + old] for old, new in _RENAMES.items()})
    return out


def to_transformers(model) -> "torch.nn.Module":
    """A transformers Qwen2ForCausalLM with the native model's weights, same dtype and device."""
    from transformers import Qwen2ForCausalLM

    param = next(model.parameters())
    with torch.device(param.device):
        hf = Qwen2ForCausalLM(qwen2_config(model.args, attn_implementation="sdpa", dtype=param.dtype))
    # assign=True shares the native tensors (q/k/v are views of c_attn): no second copy of the weights
    hf.load_state_dict(qwen2_state_dict(model.state_dict()), strict=True, assign=True)
    return hf.eval()
