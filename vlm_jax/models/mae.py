"""MAE's light decoder (He et al. 2021): pixels of the dropped patches from the kept ones.

The image tower encodes only the kept patches (``ViT(images, keep)``); the
decoder projects their tokens to its own width, puts a learned mask token at
every dropped position, adds fixed 2-D sine-cosine position embeddings,
runs ``depth`` pre-LN blocks and predicts each patch's p × p × 3 pixels.
Its parameters are plain pytrees; the objective that uses it owns them.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models.towers import Dtype, Encoder, sincos_2d


def _place_rows(full: jax.Array, index: jax.Array, x: jax.Array) -> jax.Array:
    """full[i, index[i, j]] = x[i, j]: (B, n, w), (B, k), (B, k, w). A scatter
    whose batch dimension is declared as such, so a batch-sharded decoder
    fills its own rows; ``.at[arange(B)[:, None], index].set`` made the
    partitioner all-gather the indices and updates and all-reduce (B, n, w)."""
    dims = jax.lax.ScatterDimensionNumbers(update_window_dims=(2,), inserted_window_dims=(1,),
                                           scatter_dims_to_operand_dims=(1,), operand_batching_dims=(0,),
                                           scatter_indices_batching_dims=(0,))
    return jax.lax.scatter(full, index[..., None], x.astype(full.dtype), dims, unique_indices=True)


class MAEDecoder(nn.Module):
    grid: int  # patches per side
    patch: int  # pixels per patch side
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens, keep):
        """(B, grid², patch² · 3) predictions from the kept patches' tokens
        (B, k, w_img) at positions ``keep`` (B, k)."""
        chex.assert_rank((tokens, keep), (3, 2))
        b, n = tokens.shape[0], self.grid * self.grid
        x = nn.Dense(self.width, dtype=self.dtype, name="embed")(tokens)
        mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, self.width))
        full = jnp.broadcast_to(mask_token.astype(x.dtype), (b, n, self.width))
        full = _place_rows(full, keep, x)
        full = full + jnp.asarray(sincos_2d(self.grid, self.grid, self.width), full.dtype)
        y = Encoder(self.depth, self.mlp_dim, self.num_heads, self.dtype, name="encoder")(full)
        return nn.Dense(self.patch * self.patch * 3, dtype=jnp.float32, name="head")(y).astype(jnp.float32)
