#!/usr/bin/env bash
# The batch-size study (see batch_study.py): 2 losses x 3 batch sizes x 3 seeds
# at 16,384 examples each, then one comparison table and plots in OUT/.
set -euo pipefail
OUT=${1:-sweeps/batch_study}
HERE=$(dirname "$0")
for loss in softmax sigmoid; do
  python -m vlm_jax.sweep --config "$HERE/batch_study.py:$loss" --out "$OUT/$loss" \
    --zip train.batch_size 16 64 256 --zip train.steps 1024 256 64 --zip optim.warmup_steps 100 25 6 \
    --seeds 0 1 2 --parallel "${PARALLEL:-1}" "${@:2}"
done
python -m vlm_jax.compare "$OUT"/softmax/arms/* "$OUT"/sigmoid/arms/* --out "$OUT" \
  --metrics '^train/loss$' '^zeroshot/.*/top1$' '^retrieval/.*/i2t_r1$' '^retrieval/.*/t2i_r1$' \
  --lead loss.kind train.batch_size
