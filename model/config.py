"""Model configuration: one table maps the original (GPT-2 style) and the v1.1 (HF style) config keys."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path


class ConfigError(ValueError):
    """A config.json that cannot describe a Qwen model; the message names the file and key."""


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int = 151936
    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    head_dim: int = 128
    intermediate_size: int = 11008  # MLP width: the config's ffn size halved, as the original does
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    seq_length: int = 2048  # training length: the threshold of dynamic NTK and LogN
    max_position: int = 6144
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    windows: tuple[int, ...] | None = None  # per-layer attention window in tokens; None = full attention

    def __post_init__(self):
        if self.windows is not None and len(self.windows) != self.n_layer:
            raise ConfigError(f"window schedule has {len(self.windows)} entries for {self.n_layer} layers")


# field -> config keys that may hold it, original spelling first.
_KEYS = {
    "dim": ("n_embd", "hidden_size"),
    "n_layer": ("n_layer", "num_hidden_layers"),
    "n_head": ("n_head", "num_attention_heads"),
    "ffn_size": ("ffn_hidden_size", "intermediate_size"),
    "vocab_size": ("padded_vocab_size", "vocab_size"),
    "seq_length": ("seq_length",),
    "max_position": ("n_positions", "max_position_embeddings"),
}
_OPTIONAL = {
    "head_dim": ("kv_channels",),
    "norm_eps": ("layer_norm_epsilon",),
    "rope_base": ("rotary_emb_base",),
    "use_dynamic_ntk": ("use_dynamic_ntk",),
    "use_logn_attn": ("use_logn_attn",),
}


def _lookup(cfg: dict, keys: tuple[str, ...]):
    for key in keys:
        if key in cfg:
            return cfg[key]
    return None


def args_from_config(cfg: dict, source: str = "config.json") -> ModelArgs:
    """Read a Qwen config dict (either spelling); `source` names the file in errors."""
    values = {}
    for field, keys in _KEYS.items():
        value = _lookup(cfg, keys)
        if value is None:
            raise ConfigError(f"{source}: missing size key {' or '.join(repr(k) for k in keys)}")
        values[field] = value
    for field, keys in _OPTIONAL.items():
        value = _lookup(cfg, keys)
        if value is not None:
            values[field] = value
    if cfg.get("rotary_pct", 1.0) != 1.0:
        raise ConfigError(f"{source}: rotary_pct {cfg['rotary_pct']} is not supported (Qwen uses 1.0)")
    if cfg.get("no_bias", True) is not True:
        raise ConfigError(f"{source}: no_bias=false is not a Qwen layout (only c_attn has a bias)")
    if cfg.get("tie_word_embeddings", False):
        raise ConfigError(f"{source}: tied embeddings are not a Qwen layout")
    if values["ffn_size"] % 2:
        raise ConfigError(f"{source}: ffn size {values['ffn_size']} is odd; Qwen halves it for SwiGLU")
    values["intermediate_size"] = values.pop("ffn_size") // 2
    values.setdefault("head_dim", values["dim"] // values["n_head"])
    if values["head_dim"] * values["n_head"] != values["dim"]:
        raise ConfigError(f"{source}: kv_channels x n_head must equal the hidden size")
    return ModelArgs(**values)


def model_shape(args: ModelArgs) -> dict:
    """The sizes that tell the published models apart (recorded in every run: eval/report.py matches on them)."""
    return {"dim": args.dim, "n_layer": args.n_layer, "n_head": args.n_head,
            "intermediate_size": args.intermediate_size, "vocab_size": args.vocab_size}


def read_config(path: Path) -> ModelArgs:
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    return args_from_config(cfg, str(path))


def parse_windows(spec, n_layer: int) -> tuple[int, ...] | None:
    """Layer-wise window schedule, lowest layer first.

    Accepted: None/"none"/"off" (full attention); an int or "8192" (every layer); a list of ints
    (one per layer); "4x2048,4x4096,8192": COUNTxSIZE groups from layer 0 up, a bare last SIZE
    filling the remaining layers (the maintainers' example: 4 layers at 2048, 4 at 4096, the rest 8192);
    "auto": that example scaled to the model, see `auto_windows`.
    """
    if spec is None or spec is False or (isinstance(spec, str) and spec.strip().lower() in ("", "none", "off")):
        return None
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        raise ConfigError("window schedule 'auto' needs the model's seq_length: use with_switches")
    if isinstance(spec, int):
        return (spec,) * n_layer
    if isinstance(spec, (list, tuple)):
        windows = tuple(int(w) for w in spec)
    else:
        windows = _parse_window_string(spec, n_layer)
    if len(windows) != n_layer or min(windows) < 1:
        raise ConfigError(f"window schedule {spec!r} gives sizes {list(windows)}; needs one size of at least 1 "
                          f"for each of the {n_layer} layers")
    return windows


def _parse_window_string(spec: str, n_layer: int) -> tuple[int, ...]:
    windows: list[int] = []
    parts = [p.strip() for p in spec.split(",")]
    for i, part in enumerate(parts):
        match = re.fullmatch(r"(?:(\d+)x)?(\d+)", part)
        if not match:
            raise ConfigError(f"window schedule {spec!r}: cannot read {part!r} (expected SIZE or COUNTxSIZE)")
        count, size = match.groups()
        if count is None and i != len(parts) - 1:
            raise ConfigError(f"window schedule {spec!r}: only the last entry may omit COUNTx")
        windows += [int(size)] * (int(count) if count else max(n_layer - len(windows), 0))
    return tuple(windows)


def with_switches(args: ModelArgs, dynamic_ntk=None, logn=None, window_attn=None) -> ModelArgs:
    """Apply the long-context switches; None keeps what the checkpoint's config says."""
    changes = {}
    if dynamic_ntk is not None:
        changes["use_dynamic_ntk"] = bool(dynamic_ntk)
    if logn is not None:
        changes["use_logn_attn"] = bool(logn)
    if window_attn is not None:
        if isinstance(window_attn, str) and window_attn.strip().lower() == "auto":
            window_attn = auto_windows(args)
        changes["windows"] = parse_windows(window_attn, args.n_layer)
    return replace(args, **changes)


def auto_windows(args: ModelArgs) -> str:
    """The maintainers' example (Qwen-7B: 4 layers at 2048, 4 at 4096, the rest 8192) scaled to a model:
    the lowest eighth of the layers at seq_length, the next eighth at 2x, the rest at 4x."""
    eighth = max(1, args.n_layer // 8)
    s = args.seq_length
    return f"{eighth}x{s},{eighth}x{2 * s},{4 * s}"
