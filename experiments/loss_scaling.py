"""Loss-scaling benchmark: memory, time and the largest batch per loss impl.

    python experiments/loss_scaling.py --kinds softmax,sigmoid --batch-sizes 1024,4096 --devices 1,8
    python experiments/loss_scaling.py --max-batch --budget-gb 2.5 --devices 8 --impls all_gather,tiled

See vlm_jax/bench/loss_scaling.py (the library this entry calls) for every option.
"""

import sys

from vlm_jax.bench import loss_scaling

if __name__ == "__main__":
    loss_scaling.main(sys.argv[1:])
