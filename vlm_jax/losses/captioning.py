"""Teacher-forced captioning: the next-token negative log-likelihood.

For caption tokens y (B, L), 0 = padding, and decoder logits z (B, L, V)
where z[:, l] predicts y[:, l] from the tokens before it (the decoder's
input is shifted right, ``vlm_jax.models.decoder``):

    nll_i   = Σ_{l : y_{i,l} ≠ 0}  logsumexp(z_{i,l}) − z_{i,l,y_{i,l}}
    count_i = #{l : y_{i,l} ≠ 0}
    L_cap   = Σ_i nll_i / Σ_i count_i          (the mean over the batch's real tokens)

``token_nll`` returns the per-example (nll, count); the objective divides
their sums over the whole global batch, so k micro-batches give exactly the
full batch's loss (``vlm_jax.step.make_grad_fn`` accumulates the per-example
terms; the division is done once).

Memory: the logits, B·L·V floats per step (sharded with the batch: B/n
rows per device), and their softmax in the backward pass. Communication:
none beyond the data-parallel gradient all-reduce and one all-reduce of the
two sums. FLOPs: 2·B·L·w·V for the vocabulary head.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def token_nll(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(nll (B,), count (B,)) in float32; see the module docstring."""
    chex.assert_rank(logits, 3)
    chex.assert_rank(tokens, 2)
    chex.assert_equal_shape_prefix((logits, tokens), 2)
    z = logits.astype(jnp.float32)
    mask = (tokens != 0).astype(jnp.float32)
    picked = jnp.take_along_axis(z, tokens[..., None], axis=-1)[..., 0]
    per_token = jax.nn.logsumexp(z, axis=-1) - picked
    return (per_token * mask).sum(axis=1), mask.sum(axis=1)


def caption_loss(nll: jax.Array, count: jax.Array) -> jax.Array:
    """The mean over the batch's real tokens of per-example ``token_nll`` sums."""
    return nll.sum() / jnp.maximum(count.sum(), 1.0)
