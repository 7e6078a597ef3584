"""Pure-function contrastive losses with negatives from every device.

CLIP softmax (also with hard-negative captions: NegCLIP), SigLIP sigmoid,
UniCL, SLIP image–image InfoNCE, FILIP and the region–word sigmoid loss,
each with impl in ``IMPLS``. Formulas, memory, communication and FLOPs are in
each docstring and in docs/losses.md.

Modules, imports running downwards only: ``ring`` (the primitives: matmuls,
the device ring, tiles, axis bookkeeping) ← the engines ``infonce`` (every
softmax/InfoNCE objective) and ``sigmoid`` (SigLIP, and its keyed form for
region–word) ← ``api`` (the one dispatch path and the losses) ← this package.
"""

from vlm_jax.losses.api import (
    IMPLS,
    filip_loss,
    filip_sim,
    image_infonce_loss,
    negclip_loss,
    region_word_loss,
    sigmoid_loss,
    softmax_loss,
    unicl_loss,
)
from vlm_jax.losses.ring import auto_tile, axis_devices

__all__ = [
    "softmax_loss", "sigmoid_loss", "unicl_loss", "image_infonce_loss", "negclip_loss", "filip_loss",
    "region_word_loss", "filip_sim",
    "IMPLS", "axis_devices", "auto_tile",
]
