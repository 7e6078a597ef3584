"""LiT (locked-image tuning) on the embedded dataset, from any run or converted checkpoint.

    python -m vlm_jax.train --config configs/lit.py:workdirs/default --workdir workdirs/lit
    python -m vlm_jax.train --config configs/lit.py:workdirs/clip_b16 --workdir workdirs/lit_clip

The argument is a workdir holding a checkpoint: a finished run of any config,
or a published model imported by ``python -m vlm_jax.convert``. Its image
tower (and image projection, if it has one) is loaded and frozen (no
gradient, no optimizer state, no weight decay); a new text tower of this
config, its projection and the temperature train. The image tower's fields,
the embedding size and the image resolution are taken from the workdir's
``config.json``, so the loaded tower always fits; the text tower is the
default small one over the embedded dataset's tokenizer.
"""

import json
import os

from vlm_jax.config import base_config

# What LiT takes from the source run: its image tower and where its embedding lives.
FROM_SOURCE = (("model", "image"), ("model", "embed_dim"), ("model", "image_projection"), ("data", "image_size"))


def get_config(source_workdir: str = "workdirs/default"):
    config = base_config()
    path = os.path.join(source_workdir, "config.json")
    if os.path.exists(path):  # absent: the workdir is checked (and refused) when training starts
        with open(path) as f:
            source = json.load(f)
        for section, field in FROM_SOURCE:
            value = source[section][field]
            if isinstance(value, dict):
                config[section][field].update({k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
            else:
                config[section][field] = value
    config.model_init.workdir = source_workdir
    towers = ("image", "img_proj") if config.model.image_projection else ("image",)  # SigLIP: no image projection
    config.model_init.rules = ((rf"^({'|'.join(towers)})/", r"\1/"),)
    config.train.freeze = tuple(f"^{t}/" for t in towers)
    config.train.steps = 300
    return config
