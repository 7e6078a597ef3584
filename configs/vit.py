"""The default recipe with a ViT image tower (the embedded data at 32 px).

``configs/vit.py:<kind>`` is ``configs/default.py:<kind>`` with the image
tower swapped for a plain ViT: 4 px patches (8 × 8 tokens), 96 wide, 3
deep, at learning rate 1e-3. ``:mae`` (CLIP + masked image modelling) needs
it: MAE drops patch tokens, and each must see only its own pixels (no
convolutional stem); ``:softmax`` is its CLIP baseline.
"""

import os

from vlm_jax.config import from_file


def get_config(arg: str = "softmax"):
    config = from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"), arg)
    config.model.image.tower = "vit"
    config.model.image.stem = ()
    config.model.image.patch_size = 4
    config.model.image.space_to_depth = 1
    config.data.image_size = 32
    config.optim.lr = 1e-3
    return config
