"""SigLIP (Zhai et al. 2023): the pairwise sigmoid loss with a learnable bias.

L = −(1/B) Σ_i Σ_j log σ(ℓ_ij (t·z^I_i·z^T_j + b)), ℓ_ii = +1, else −1.
Adds the scalar parameter ``bias`` (init ``config.loss.bias_init``; set
``config.loss.log_t_init = log 10`` as the paper does: ``configs/default.py:sigmoid``).
The loss, its impls and their costs: ``vlm_jax.losses.sigmoid_loss``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax.numpy as jnp

from vlm_jax import losses
from vlm_jax.objectives.base import Contrastive


class SigLIP(Contrastive):
    CONFIG: ClassVar[dict[str, Any]] = {"bias_init": -10.0}
    scalar_names: ClassVar[tuple[str, ...]] = ("log_t", "bias")
    pair_weights = True

    def init_parts(self, rng):
        return {**super().init_parts(rng), "bias": jnp.asarray(self.loss.bias_init, jnp.float32)}

    def combine(self, outputs, scalars, batch):
        log_t, bias = scalars["log_t"], scalars["bias"]
        loss = losses.sigmoid_loss(outputs["zimg"], outputs["ztxt"], log_t, bias, weights=batch.get("weight"),
                                   **self.loss_kw)
        return loss, {"log_temp": log_t, "bias": bias}
