"""Beam search (greedy = one beam) over a cached step function, jitted.

A model provides
  * ``first(cache) -> (log-probs (N, V), cache)``: position 0;
  * ``step(cache, tokens (N,), pos) -> (log-probs (N, V), cache)``: position
    ``pos`` given the token written at ``pos − 1``;
  * ``reorder(cache, rows (N,)) -> cache``: the cache of rows ``rows`` (beams
    that survive a step take their parent's keys and values);
with N the rows it was started on. ``beam_search`` runs them for ``length``
positions over B × K rows (K beams per example): each position extends every
live beam by every token but padding (id 0), keeps the K best sums of
log-probabilities, and a beam that wrote ``eos_id`` is finished: it is
extended only by padding, at no cost. The result is each example's best beam
by score / (number of tokens) ** ``length_penalty`` (0: the plain sum, as
greedy decoding maximises step by step).

Cost: ``length`` calls of ``step`` on B·K rows, each one position (the
model's keys and values of earlier positions are cached), instead of a full
re-run per position; memory: the cache, O(B·K·length·width·depth).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

First = Callable[[Any], tuple[jax.Array, Any]]
Step = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]
Reorder = Callable[[Any, jax.Array], Any]


def init_cache(module: nn.Module, variables: dict, *args) -> Any:
    """The "cache" collection of a ``decode=True`` module for inputs shaped
    like ``args`` (full length), zeroed: position 0, nothing cached."""
    _, state = jax.eval_shape(lambda v, *a: module.apply(v, *a, mutable=["cache"]), variables, *args)
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), state["cache"])


def take_rows(tree: Any, rows: jax.Array, axis: int = 0) -> Any:
    """Every array of ``tree`` with more than ``axis`` dimensions, indexed by
    ``rows`` along ``axis`` (the batch axis; counters below it are shared)."""
    return jax.tree_util.tree_map(lambda x: jnp.take(x, rows, axis=axis) if x.ndim > axis else x, tree)


def beam_search(first: First, step: Step, reorder: Reorder, cache: Any, batch: int, beams: int, length: int,
                eos_id: int, length_penalty: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """(tokens (B, length), score (B,)): the best beam of each example and its
    summed log-probability; see the module docstring. ``cache`` is for B rows."""
    b, k = batch, beams
    logp, cache = first(cache)
    vocab = logp.shape[-1]
    no_pad = jnp.zeros((vocab,), jnp.float32).at[0].set(-jnp.inf)
    # position 0: the K best first tokens of each example (beams beyond the
    # vocabulary start at -inf and are never chosen while another is finite)
    logp0 = jnp.pad(logp.astype(jnp.float32) + no_pad, ((0, 0), (0, max(0, k - vocab))), constant_values=-jnp.inf)
    scores, tokens = jax.lax.top_k(logp0, k)  # (B, K)
    tokens = jnp.where(tokens < vocab, tokens, 0)
    seqs = jnp.zeros((b, k, length), jnp.int32).at[:, :, 0].set(tokens.astype(jnp.int32))
    done = tokens == eos_id
    cache = reorder(cache, jnp.repeat(jnp.arange(b), k))  # B·K rows, example-major
    pad_only = jnp.full((vocab,), -jnp.inf, jnp.float32).at[0].set(0.0)

    def body(pos, carry):
        seqs, scores, done, cache = carry
        logp, cache = step(cache, seqs[:, :, pos - 1].reshape(b * k), pos)
        logp = logp.astype(jnp.float32).reshape(b, k, vocab)
        logp = jnp.where(done[..., None], pad_only, logp + no_pad)
        best, flat = jax.lax.top_k((scores[..., None] + logp).reshape(b, k * vocab), k)
        parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        seqs = jnp.take_along_axis(seqs, parent[..., None], axis=1).at[:, :, pos].set(token)
        done = jnp.take_along_axis(done, parent, axis=1) | (token == eos_id)
        cache = reorder(cache, (jnp.arange(b)[:, None] * k + parent).reshape(b * k))
        return seqs, best, done, cache

    seqs, scores, done, _ = jax.lax.fori_loop(1, length, body, (seqs, scores, done, cache))
    lengths = jnp.maximum((seqs != 0).sum(-1), 1).astype(jnp.float32)
    final = scores / lengths ** length_penalty
    pick = jnp.argmax(final, axis=1)
    rows = jnp.arange(b)
    return seqs[rows, pick], scores[rows, pick]
