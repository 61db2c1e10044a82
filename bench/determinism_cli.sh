#!/usr/bin/env bash
# tiny-qwen-256 (a trained model) through the CLI on GPUs in bf16: samples.jsonl must be byte-identical
# at --batch-size 1, 7 and automatic, with the few-shot prefix reused or not, and on 1 or 2 torchrun ranks.
#
# Usage (on a machine with 2 GPUs; one GPU skips the 2-rank run): bench/determinism_cli.sh [MMLU_LIMIT GSM8K_LIMIT]
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${TINY_QWEN:-../shared/models/tiny-qwen-256}
DATA=${DATA_DIR:-../shared/data}
CKPT=scratch/tiny-qwen-256
OUT=${OUT_ROOT:-scratch/determinism-cli}
mkdir -p "$CKPT"
[ -s "$CKPT/model.safetensors" ] || gunzip -c "$SRC/model.safetensors.gz" > "$CKPT/model.safetensors"
cp "$SRC"/{config.json,generation_config.json,qwen.tiktoken,tokenizer_config.json} "$CKPT/"
rm -rf "$OUT"

run() {  # name, then the launcher and its flags
    local name=$1; shift
    "$@" --task mmlu --limit "${MMLU_LIMIT:-4}" --model "$CKPT" --data-dir "$DATA" --dtype bf16 --no-progress --device "${DEVICE:-auto}" \
        --output-dir "$OUT/$name" >"$OUT/$name-mmlu.log" 2>&1
    "$@" --task gsm8k --limit "${GSM8K_LIMIT:-64}" --model "$CKPT" --data-dir "$DATA" --dtype bf16 --no-progress --device "${DEVICE:-auto}" \
        --output-dir "$OUT/$name" >"$OUT/$name-gsm8k.log" 2>&1
}
mkdir -p "$OUT"
run auto python3 eval/runner.py
run batch1 python3 eval/runner.py --batch-size 1
run whole python3 eval/runner.py --no-prefix-reuse
if [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    DEVICE=auto run ranks2 python3 -m torch.distributed.run --nproc-per-node 2 eval/runner.py
fi

echo "| run | task | samples.jsonl vs auto |"
echo "|---|---|---|"
for dir in "$OUT"/*/; do
    name=$(basename "$dir")
    [ "$name" = auto ] && continue
    for task in mmlu gsm8k; do
        a=$(ls "$OUT"/auto/*/"$task"-*/samples.jsonl); b=$(ls "$dir"*/"$task"-*/samples.jsonl)
        if cmp -s "$a" "$b"; then verdict="identical"; else verdict="differs ($(python3 - "$a" "$b" <<'PY'
import json, sys
a, b = ([json.loads(l) for l in open(p)] for p in sys.argv[1:])
print(sum(x != y for x, y in zip(a, b)), "of", len(a), "records")
PY
))"; fi
        echo "| $name | $task | $verdict |"
    done
done
