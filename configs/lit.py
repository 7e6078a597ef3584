"""LiT (locked-image tuning) on the embedded dataset.

    python -m vlm_jax.train --config configs/lit.py:workdirs/default --workdir workdirs/lit

The argument is the workdir of a finished run of configs/default.py: its image
tower and image projection are loaded and frozen (no gradient, no optimizer
state, no weight decay); the text tower, text projection and temperature train.
"""

from vlm_jax.config import base_config


def get_config(source_workdir: str = "workdirs/default"):
    config = base_config()
    config.model_init.workdir = source_workdir
    config.model_init.rules = ((r"^(image|img_proj)/", r"\1/"),)
    config.train.freeze = (r"^image/", r"^img_proj/")
    config.train.steps = 300
    return config
