"""Train-step throughput and MFU, with remat / scan / bf16 variants side by side.

    python experiments/train_throughput.py --config configs/default.py --batch 256 --steps 5
    python experiments/train_throughput.py --config configs/published.py:clip_vit_b16 --batch 256 \
        --variants 'model.dtype=bfloat16;model.dtype=bfloat16,model.remat=full'

See vlm_jax/bench/throughput.py (the library this entry calls).
"""

import sys

from vlm_jax.bench import throughput

if __name__ == "__main__":
    throughput.main(sys.argv[1:])
