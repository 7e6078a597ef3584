"""Pure-function contrastive losses; see ``contrastive`` for formulas and costs."""

from vlm_jax.losses.contrastive import SIGMOID_IMPLS, SOFTMAX_IMPLS, sigmoid_loss, softmax_loss

__all__ = ["softmax_loss", "sigmoid_loss", "SOFTMAX_IMPLS", "SIGMOID_IMPLS"]
