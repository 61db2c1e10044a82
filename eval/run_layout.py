"""Where a run's files go: OUTPUT_DIR/<model folder>/<task>-<mode>[-<switches>][-<backend>]-<dtype>/.

Folder names keep different runs apart instead of refusing them later: the model folder carries a
short hash of the resolved checkpoint path (two checkpoints both called step-final stay apart), the
run folder every switch given on the command line and the dtype the weights are held in.
"""
from __future__ import annotations

import re
from pathlib import Path

from .api import stable_hash

DTYPE_NAMES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


def model_folder(model_id: str | None, tokenizer: str | None = None) -> str:
    """<name>-<hash of the resolved path or hub id>; a dry run with only a tokenizer: tokenizer-<name>-<hash>."""
    if model_id is None:
        return f"tokenizer-{_named(tokenizer)}"
    return _named(model_id)


def _named(path_or_id: str) -> str:
    path = Path(path_or_id).expanduser()
    where = str(path.resolve()) if path.exists() else path_or_id  # a hub id stays as typed
    return f"{Path(path_or_id.rstrip('/')).name or 'model'}-{stable_hash(where)[:6]}"


def dtype_name(dtype) -> str:
    return DTYPE_NAMES.get(str(dtype), str(dtype).removeprefix("torch."))


def run_folder(task: str, mode: str, config, *, window_in_name: bool = True, dtype: str | None = None) -> str:
    """<task>-<mode>, then a part for each switch the run configuration gives, a non-native backend and the
    dtype (none for a dry run, which loads no weights). `window_in_name` is False for a task that sets the
    window per request (long_ppl: --window-attn is one of its options, recorded in run.json)."""
    parts = [task, mode]
    if config.dynamic_ntk is not None:
        parts.append(f"ntk_{'on' if config.dynamic_ntk else 'off'}")
    if config.logn is not None:
        parts.append(f"logn_{'on' if config.logn else 'off'}")
    if config.window_attn and window_in_name:
        parts.append("win_" + window_part(config.window_attn))
    if config.backend != "native":
        parts.append(config.backend)
    if dtype:
        parts.append(dtype)
    return "-".join(parts)


def window_part(spec: str) -> str:
    """auto and none stay words (they are different runs); a schedule keeps its digits and x's."""
    word = spec.strip().lower()
    if word in ("auto", "none", "off"):
        return "none" if word == "off" else word
    return re.sub(r"[^0-9x,]", "", spec).replace(",", "_")
