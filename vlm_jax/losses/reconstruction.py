"""Masked image modelling: MAE's pixel reconstruction loss.

For an image x (normalised to [-1, 1]) cut into N patches of p × p × 3
pixels, row-major over the grid, the target of patch j is its pixels
normalised by their own mean and standard deviation (MAE's ``norm_pix_loss``,
ε = 1e-6 inside the square root). With predictions ŷ and the dropped set M_i
of example i:

    mse_i   = Σ_{j ∈ M_i} mean_pixels (ŷ_ij − y_ij)²,    count_i = |M_i|
    L_MAE   = Σ_i mse_i / Σ_i count_i      (the mean over the global batch's dropped patches)

``masked_mse`` returns the per-example (mse, count); the objective divides
their global sums once, so accumulation is exact. Memory: the predictions
and targets, B·N·p²·3 floats (the size of the images); communication: none
beyond data parallelism.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """(B, H, W, C) -> (B, (H/p)·(W/p), p·p·C), patches row-major, pixels (row, col, channel)."""
    b, h, w, c = images.shape
    gh, gw = h // patch, w // patch
    x = images[:, :gh * patch, :gw * patch].reshape(b, gh, patch, gw, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, patch * patch * c)


def pixel_targets(images: jax.Array, patch: int, eps: float = 1e-6) -> jax.Array:
    """Each patch's pixels normalised by their own mean and variance."""
    x = patchify(images.astype(jnp.float32), patch)
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps)


def masked_mse(pred: jax.Array, target: jax.Array, dropped: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mse (B,), count (B,)) over the ``dropped`` (B, N) patches."""
    chex.assert_equal_shape((pred, target))
    chex.assert_shape(dropped, pred.shape[:2])
    m = dropped.astype(jnp.float32)
    per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
    return (per_patch * m).sum(axis=1), m.sum(axis=1)


def mae_loss(mse: jax.Array, count: jax.Array) -> jax.Array:
    return mse.sum() / jnp.maximum(count.sum(), 1.0)
