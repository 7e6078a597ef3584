"""Default: a tiny two-tower model on the embedded shapes dataset.

Trains on a 2-core CPU in a few minutes. The argument picks the objective:
``configs/default.py`` (CLIP softmax InfoNCE), ``:sigmoid`` (SigLIP,
log t = log 10, b = −10), ``:unicl`` (image–text–label: captions sharing the
subject's colour–shape class are positives), ``:slip`` (CLIP + image–image
InfoNCE between two augmented views), ``:filip`` (token-wise late interaction),
``:coca`` (CLIP + a captioning decoder over the image tokens, weights 1 and 2).

The recipe (docs/ablations.md has the trials behind it): a ViT whose 8-pixel
patches are cut by a three-convolution stem (16 tokens: the whole run, crops
included, trains at twice the examples/s of the plain patch-4 ViT), 1,000
steps of batch 128, random crops of 35–100 % of the image (scale jitter:
without it the model tells shapes apart by their pixel area, a shortcut),
and the softmax (CLIP) temperature started at t = 30.
"""

import math

from vlm_jax.config import base_config


def get_config(arg: str = "softmax"):
    config = base_config()
    config.loss.kind = arg
    if arg == "sigmoid":
        config.loss.log_t_init = math.log(10.0)
        config.loss.bias_init = -10.0
    elif arg in ("softmax", "coca"):
        config.loss.log_t_init = math.log(30.0)
    config.model.image.stem = (32, 64, 128)
    config.model.image.patch_size = 8
    config.data.crop_area = (0.35, 1.0)
    config.train.steps = 1000
    config.train.batch_size = 128
    config.train.eval_every = 500
    return config
