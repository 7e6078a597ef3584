"""Region features from a tower's patch tokens: boxes as soft patch masks.

A box (y_min, x_min, y_max, x_max) in [0, 1] of the image covers each cell
of the g × g token grid by a fraction (its overlap area over the cell's
area); a region's feature is the mean of the tokens weighted by those
fractions (RegionCLIP's pooling of dense features inside a box, without
RoIAlign's bilinear sampling: at a few tokens per side, area weights are the
exact cover). The background of an image is weighted by what its boxes leave
uncovered. Pure ``jax.numpy``; the evaluators call the same functions.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp


def grid_side(num_tokens: int, field: str = "the image tower") -> int:
    """g for g × g tokens; a ValueError naming ``field`` if not square."""
    g = math.isqrt(num_tokens)
    if g * g != num_tokens:
        raise ValueError(f"{field}: {num_tokens} tokens are not a square grid; region pooling needs g × g patch "
                         f"tokens (a ViT without a class token among them, or a ResNet's spatial map)")
    return g


def box_weights(boxes: jax.Array, grid: int) -> jax.Array:
    """(..., 4) boxes -> (..., grid²) fraction of each cell (row-major) inside the box."""
    chex.assert_axis_dimension(boxes, -1, 4)
    edges = jnp.arange(grid + 1, dtype=jnp.float32) / grid
    lo, hi = edges[:-1], edges[1:]

    def cover(a, b):  # (..., grid): overlap of [a, b] with each cell, over the cell's length
        return jnp.clip(jnp.minimum(b[..., None], hi) - jnp.maximum(a[..., None], lo), 0.0, None) * grid

    wy = cover(boxes[..., 0], boxes[..., 2])
    wx = cover(boxes[..., 1], boxes[..., 3])
    return (wy[..., :, None] * wx[..., None, :]).reshape(*boxes.shape[:-1], grid * grid)


def background_weights(weights: jax.Array, present: jax.Array) -> jax.Array:
    """(B, R, n) box cover and (B, R) present flags -> (B, n) what no present box covers."""
    covered = jnp.sum(weights * present[..., None].astype(weights.dtype), axis=1)
    return jnp.clip(1.0 - covered, 0.0, 1.0)


def pool(tokens: jax.Array, weights: jax.Array) -> jax.Array:
    """(B, n, d) tokens, (B, R, n) weights -> (B, R, d) weighted means (0 where a weight row is all 0)."""
    chex.assert_equal_shape_prefix((tokens, weights), 1)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    summed = jnp.einsum("brn,bnd->brd", weights.astype(tokens.dtype), tokens, preferred_element_type=jnp.float32)
    return summed / jnp.maximum(total, 1e-6)
