#!/usr/bin/env bash
# Long-context perplexity of tiny-qwen-256 (a trained 4-layer Qwen, training length 256) on its 12 held-out
# arXiv papers, to compare with the reference table in ../shared/models/tiny-qwen-256/README.md.
#
# Window schedule "auto" = 1x256,1x512,1024 for this model: the maintainers' Qwen-7B example (lowest layers
# at the training length, the next at 2x, the rest at 4x) scaled to 4 layers. The top layers then never see
# more than 1024 tokens, so their NTK alpha stays at 7 even for 4096-token samples.
#
# Usage: [DEVICE=cuda BATCH=16 DTYPE=bf16 OUTPUT_DIR=...] bench/tiny_long_ppl.sh [extra runner args, e.g. --limit 5]
# The full run scores 4.2M tokens (1,632 samples x 4 rows): 2-4 hours on 2 CPU cores, where the
# 151,936 x 128 LM head and its fp32 logits dominate (270-510 tokens/s); under 2 minutes on one H100
# (DEVICE=cuda BATCH=16). `--limit 5` (the first sample of every length per paper) takes ~13 CPU minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${TINY_QWEN:-../shared/models/tiny-qwen-256}
DATA=${DATA_DIR:-../shared/data}
CKPT=scratch/tiny-qwen-256
HELD_OUT="0003/hep-ph0003058 0712/0712.4385 0910/0910.0369 1103/1103.3685 1111/1111.2568 1209/1209.2834
          1305/1305.6565 1312/1312.2964 1501/1501.06674 1507/1507.01828 1511/1511.08255 1606/1606.05885"

mkdir -p "$CKPT"
if [ ! -s "$CKPT/model.safetensors" ]; then
    gunzip -c "$SRC/model.safetensors.gz" > "$CKPT/model.safetensors.tmp"
    mv "$CKPT/model.safetensors.tmp" "$CKPT/model.safetensors"
fi
cp "$SRC"/{config.json,generation_config.json,qwen.tiktoken,tokenizer_config.json} "$CKPT/"

subjects=$(for p in $HELD_OUT; do printf 'korzen_groundtruth/%s.body,' "$p"; done)
# CPU: batch 1 keeps the fp32 logits of a 1024-token chunk (0.6 GB) to one row; GPU: BATCH=16 DEVICE=cuda
exec python3 eval/runner.py --task long_ppl --model "$CKPT" --data-dir "$DATA" \
    --lengths 256,512,1024,2048,4096 --subjects "${subjects%,}" --window-attn auto \
    --output-dir "${OUTPUT_DIR:-results/reference}" --batch-size "${BATCH:-1}" --dtype "${DTYPE:-fp32}" \
    --device "${DEVICE:-cpu}" "$@"
