"""Default: a tiny two-tower model on the embedded shapes dataset.

Trains on a 2-core CPU in a few minutes. The argument picks the objective:
``configs/default.py`` (CLIP softmax InfoNCE), ``:sigmoid`` (SigLIP,
log t = log 10, b = −10), ``:unicl`` (image–text–label: captions sharing the
subject's colour–shape class are positives), ``:slip`` (CLIP + image–image
InfoNCE between two augmented views), ``:filip`` (token-wise late interaction).
"""

import math

from vlm_jax.config import base_config


def get_config(arg: str = "softmax"):
    config = base_config()
    config.loss.kind = arg
    if arg == "sigmoid":
        config.loss.log_t_init = math.log(10.0)
        config.loss.bias_init = -10.0
    config.train.steps = 500
    config.train.batch_size = 128
    return config
