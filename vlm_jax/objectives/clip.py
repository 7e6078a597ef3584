"""CLIP (Radford et al. 2021): softmax InfoNCE between pooled image and text embeddings.

L = ½ (L_{I→T} + L_{T→I}) over the global batch, t = exp(log_t) learnable
(init ``config.loss.log_t_init`` = log 1/0.07). The loss, its impls and
their costs: ``vlm_jax.losses.softmax_loss``.
"""

from __future__ import annotations

from vlm_jax import losses
from vlm_jax.objectives.base import Contrastive


class CLIP(Contrastive):
    pair_weights = True

    def combine(self, outputs, scalars, batch):
        log_t = scalars["log_t"]
        loss = losses.softmax_loss(outputs["zimg"], outputs["ztxt"], log_t, weights=batch.get("weight"),
                                   **self.loss_kw)
        return loss, {"log_temp": log_t}
