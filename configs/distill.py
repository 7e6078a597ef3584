"""Distillation of a finished run into a student at half its widths.

    python -m vlm_jax.train --config configs/distill.py:workdirs/default --workdir workdirs/student

The argument is the teacher's workdir (a run of ``configs/default.py`` or any
two-tower run on the embedded data). The student is the default recipe with
the image tower's ``base_width`` (ResNet) or ``width`` (ViT), the text
tower's width and both MLP sizes halved, the teacher's embedding size and
image size; it trains for 2,000 steps with CLIP's loss plus the embedding
(weighted 10) and similarity distillation terms (``vlm_jax.objectives.distill``). The teacher's
parameters are loaded from its latest checkpoint under ``teacher/`` and
frozen.
"""

import os

from vlm_jax.config import from_file
from vlm_jax.objectives.distill import PREFIX, teacher_config

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(teacher_workdir: str = "workdirs/default"):
    config = from_file(os.path.join(HERE, "default.py"), "softmax")
    config.loss.kind = "distill"
    config.loss.teacher_workdir = teacher_workdir
    config.loss.embed_weight = 10.0  # matching the teacher's embeddings closely carries its composition (docs/losses.md)
    config.train.steps = 2000  # the student is cheaper per step; twice the 1,000 steps its teacher had when measured
    if os.path.exists(os.path.join(teacher_workdir, "config.json")):  # absent: refused by name at config time
        source = teacher_config(teacher_workdir)
        config.model.embed_dim = source["model"]["embed_dim"]
        config.data.image_size = source["data"]["image_size"]
        image, text = source["model"]["image"], source["model"]["text"]
        config.model.image.update(dict(tower=image["tower"], layers=tuple(image["layers"]),
                                       base_width=max(1, image["base_width"] // 2), width=max(1, image["width"] // 2),
                                       mlp_dim=max(1, image["mlp_dim"] // 2)))
        config.model.text.update(dict(width=max(1, text["width"] // 2), mlp_dim=max(1, text["mlp_dim"] // 2)))
    config.model_init.workdir = teacher_workdir
    config.model_init.rules = ((rf"^{PREFIX}/", ""),)  # teacher/<path> is the teacher's <path>
    config.train.freeze = (rf"^{PREFIX}/",)
    return config
