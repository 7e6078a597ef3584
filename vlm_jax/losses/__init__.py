"""Pure-function contrastive losses with negatives from every device.

``contrastive``: CLIP softmax and SigLIP sigmoid; ``objectives``: UniCL,
SLIP image–image InfoNCE, FILIP. Formulas, memory, communication and FLOPs
are in each docstring and in docs/losses.md.
"""

from vlm_jax.losses.contrastive import SIGMOID_IMPLS, SOFTMAX_IMPLS, sigmoid_loss, softmax_loss
from vlm_jax.losses.objectives import IMPLS as OBJECTIVE_IMPLS, filip_loss, image_infonce_loss, unicl_loss

__all__ = [
    "softmax_loss", "sigmoid_loss", "unicl_loss", "image_infonce_loss", "filip_loss",
    "SOFTMAX_IMPLS", "SIGMOID_IMPLS", "OBJECTIVE_IMPLS",
]
