"""lm-evaluation-harness spellings on qwen-eval's command line: those that mean the same as one of our flags are
rewritten to it (README "Coming from lm-evaluation-harness"); the rest get one line naming our flag."""
from __future__ import annotations

from .api import UserError

SAME = {"--tasks": "--task", "--output_path": "--output-dir", "--batch_size": "--batch-size"}
WITHOUT_EFFECT = {"--log_samples"}  # every run writes samples.jsonl
REFUSED = {
    "--model_args": "qwen-eval takes the checkpoint itself: --model PATH_OR_HUB_ID (and --dtype, --backend hf)",
    "--apply_chat_template": "qwen-eval's chat prompts are the original zero-shot ChatML ones: --mode chat",
    "--num_fewshot": "each task uses the original's number of shots (EVALUATION.md); there is no --num-fewshot",
}
MODEL_TYPES = {"hf", "hf-auto", "vllm", "local-completions", "local-chat-completions"}


def translate(argv: list[str]) -> list[str]:
    """argv with lm-evaluation-harness spellings rewritten; a UserError for one that has no clean equivalent."""
    out: list[str] = []
    items = iter(argv)
    for item in items:
        flag, eq, value = item.partition("=")
        if flag in REFUSED:
            raise UserError(f"{flag} is lm-evaluation-harness's: {REFUSED[flag]}")
        if flag in WITHOUT_EFFECT:
            continue
        if flag not in (*SAME, "--limit", "--model"):
            out.append(item)
            continue
        value = value if eq else next(items, "")
        out += _translated(SAME.get(flag, flag), value)
    return out


def _translated(flag: str, value: str) -> list[str]:
    if flag == "--batch-size" and value.startswith("auto"):
        return []  # our default: sized from free memory
    if flag == "--limit" and "." in value:
        raise UserError(f"--limit {value}: a fraction of each task is lm-evaluation-harness's; qwen-eval's --limit N "
                        f"takes the first N documents of each subject")
    if flag == "--model" and value in MODEL_TYPES:
        raise UserError(f"--model {value} is an lm-evaluation-harness model type; qwen-eval's --model is the "
                        f"checkpoint folder or hub id (--backend hf runs it with transformers)")
    return [flag, value]
