"""Image–text matching (ITM) with hard negatives drawn from the global batch.

ALBEF's / BLIP's binary task: a fusion module reads an (image, caption) pair
and says whether they belong together. The positives are the batch's B pairs;
the negatives are the hardest-looking wrong pairs, drawn in proportion to the
contrastive similarity over the whole global batch (every device's rows):

    p(j | i) ∝ exp(t · s_ij) · [caption_j ≠ caption_i]      (a negative caption for image i)
    p(i | j) ∝ exp(t · s_ij) · [caption_i ≠ caption_j]      (a negative image for caption j)

with s = z^I z^Tᵀ the cosine similarities and t = exp(log_t), both without
gradient (sampling is not differentiated). A caption equal to the row's own,
token for token, is never drawn: the diagonal (the positive) always is one,
and so is a duplicate caption elsewhere in the batch, whose pair would be a
positive labelled negative. A row whose every column is a duplicate has no
negative; its term is left out of the loss (``valid`` False).

Each draw is an inverse-CDF sample of its row's distribution at a uniform
u ∈ [0, 1) that the input pipeline draws per example from (seed, step,
example position) (``draw_uniforms``), so the negatives are the same on any
device count and under any accumulation: they depend on the global batch's
values only. With the 3B pairs' two-way logits ℓ_p (from ``pair_logits``)
and labels y_p (1 for the B positives, 0 for the 2B negatives):

    L_ITM = Σ_p v_p · (logsumexp(ℓ_p) − ℓ_{p, y_p}) / Σ_p v_p

Memory: the B × B similarities and sampling weights (the gathered form; a
tiled sampler is possible with Gumbel-max but not built), and the fusion
module's activations for 3B pairs. Communication: the similarities need every
device's embeddings (an all-gather of B·d floats each way, as the
all_gather contrastive impl), and the negatives' tokens move to the device
of the row that drew them (a gather of 2B token blocks). Sampling costs
O(B²); the fusion module's 3B forward passes dominate.
"""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

# Two multipliers for the rolling hashes of a token row (odd, so invertible mod 2^32).
_HASH_BASES = (0x9E3779B1, 0x85EBCA77)


def caption_keys(tokens: jax.Array) -> jax.Array:
    """(B, 2) uint32: two rolling hashes of each row of ``tokens`` (B, L);
    equal rows have equal keys, and distinct rows collide with probability
    about 2^-64."""
    chex.assert_rank(tokens, 2)
    t = tokens.astype(jnp.uint32)
    keys = []
    for base in _HASH_BASES:
        h = jnp.zeros(t.shape[0], jnp.uint32)
        for pos in range(t.shape[1]):
            h = h * jnp.uint32(base) + t[:, pos] + jnp.uint32(1)
        keys.append(h)
    return jnp.stack(keys, axis=1)


def same_caption(tokens: jax.Array) -> jax.Array:
    """(B, B) bool: row i and column j carry the same caption (the diagonal included)."""
    k = caption_keys(tokens)
    return jnp.all(k[:, None, :] == k[None, :, :], axis=-1)


def draw_uniforms(rng: np.random.Generator) -> np.ndarray:
    """One example's two uniforms (negative caption, negative image), drawn by
    the input pipeline from the example's own generator."""
    return rng.random(2).astype(np.float32)


def sample_rows(logits: jax.Array, excluded: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(index (B,), valid (B,)): for each row, column j drawn with probability
    ∝ exp(logits_ij) among the columns not ``excluded``, by inverse CDF at u_i.
    An excluded column is never returned; a row with none allowed is not valid."""
    chex.assert_rank((logits, excluded, u), (2, 2, 1))
    allowed = ~excluded
    z = jnp.where(allowed, logits.astype(jnp.float32), -jnp.inf)
    top = jnp.max(z, axis=1, keepdims=True)
    w = jnp.where(allowed, jnp.exp(z - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    cdf = jnp.cumsum(w, axis=1)
    target = u.astype(jnp.float32) * cdf[:, -1]
    index = jnp.sum(cdf <= target[:, None], axis=1)
    # rounding can put the target at the total: fall back to the last allowed column
    last_allowed = logits.shape[1] - 1 - jnp.argmax(allowed[:, ::-1], axis=1)
    return jnp.minimum(index, last_allowed).astype(jnp.int32), jnp.any(allowed, axis=1)


def hard_negatives(sim: jax.Array, log_t: jax.Array, same: jax.Array, u: jax.Array):
    """((negative caption per image, valid), (negative image per caption, valid)),
    each (B,); ``u`` (B, 2) the per-example uniforms. No gradient."""
    chex.assert_rank((sim, same, u), (2, 2, 2))
    logits = jax.lax.stop_gradient(sim * jnp.exp(log_t))
    return sample_rows(logits, same, u[:, 0]), sample_rows(logits.T, same.T, u[:, 1])


def two_way_nll(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(Σ_p w_p · CE(ℓ_p, y_p), Σ_p w_p) of two-way logits (P, 2), float32."""
    chex.assert_shape(logits, (labels.shape[0], 2))
    z = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(z, labels[:, None], axis=1)[:, 0]
    w = weights.astype(jnp.float32)
    return jnp.sum(w * (jax.nn.logsumexp(z, axis=1) - picked)), jnp.sum(w)


PairLogits = Callable[[jax.Array, jax.Array], jax.Array]  # (image index (P,), caption index (P,)) -> (P, 2)


def itm_loss(sim: jax.Array, log_t: jax.Array, tokens: jax.Array, u: jax.Array,
             pair_logits: PairLogits) -> tuple[jax.Array, dict]:
    """L_ITM over the global batch (module docstring) and its metrics:
    ``itm_accuracy`` (the share of the valid pairs classified right). ``tokens``
    (B, L) the captions (duplicates are found from them); ``pair_logits``
    scores the pairs (image i, caption j) given as index vectors."""
    b = sim.shape[0]
    chex.assert_shape((sim, tokens, u), ((b, b), (b, None), (b, 2)))
    (neg_txt, ok_txt), (neg_img, ok_img) = hard_negatives(sim, log_t, same_caption(tokens), u)
    rows = jnp.arange(b, dtype=jnp.int32)
    img_idx = jnp.concatenate([rows, rows, neg_img])
    txt_idx = jnp.concatenate([rows, neg_txt, rows])
    labels = jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(2 * b, jnp.int32)])
    weights = jnp.concatenate([jnp.ones(b, bool), ok_txt, ok_img]).astype(jnp.float32)
    logits = pair_logits(img_idx, txt_idx)
    nll, count = two_way_nll(logits, labels, weights)
    right = (jnp.argmax(logits, axis=1) == labels).astype(jnp.float32)
    denom = jnp.maximum(count, 1.0)
    return nll / denom, {"itm_accuracy": jnp.sum(weights * right) / denom}
