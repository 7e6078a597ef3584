"""The sigmoid (SigLIP) engine: the per-device bodies of ``sigmoid_loss``.

``dense_loss`` is the single-device formula (one B×B logit matrix);
``gathered_loss`` all-gathers the texts and lets autodiff do the rest;
``ring_loss`` is memory-linear. Each device holds its b rows of z^I and z^T.
The other modality's chunk travels around the ring of N devices with
``ppermute``; at step k device p scores its images against the texts of
device (p − k) mod N. A block of logits is never stored. The loss is a sum
of independent per-pair terms, so its gradient needs no global statistic:
under differentiation (``jax.custom_vjp``'s forward rule) one pass of the
ring computes the loss and its gradients at once, the gradient accumulator
of a text chunk travelling the ring with it and arriving home after the
last step; the backward pass only scales the stored (b × d) gradients by
the cotangent. Each block costs three matmuls (logits, G·z^T, Gᵀ·z^I), the
dense path's 6·B²·d FLOPs in all, and the texts go round the ring once.
Without differentiation the pass computes the loss alone (2·B²·d).

Within a device each (b × b) block is processed in (tile × tile) pieces with
``lax.scan``; ``tile`` = b means one piece per block (the "ring" impl).

``gathered_loss`` and ``ring_loss`` are per-device bodies meant to run inside
``shard_map`` over ``axes``; they return the global loss (already reduced over
the ring).

The keyed form (``keyed_*``, the body of ``region_word_loss``) is the same
loss with positives where row and column keys are equal instead of on the
diagonal, 0/1 weights per row and column, and rows and columns of different
counts; with keys = global row numbers and unit weights it is SigLIP's.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.losses.ring import axis_tuple, dot, dot_t, shift, tiles, varying

# --------------------------------------------------------------------------- dense and gathered


def _sigmoid_block_sum(zi, zt, t, bias, diag_offset):
    """Σ_ij −log σ(ℓ_ij (t·z^I_i·z^T_j + b)) over one block; positives on the
    diagonal shifted by ``diag_offset`` columns (or none if out of range)."""
    logits = t * dot_t(zi, zt) + bias
    rows = jnp.arange(zi.shape[0])[:, None]
    cols = jnp.arange(zt.shape[0])[None, :]
    sign = jnp.where(cols == rows + diag_offset, 1.0, -1.0)
    return jnp.sum(jax.nn.softplus(-sign * logits))


def dense_loss(zimg, ztxt, log_t, bias):
    """The formula on the arrays as given: one B×B logit matrix."""
    t = jnp.exp(log_t.astype(jnp.float32))
    return _sigmoid_block_sum(zimg, ztxt, t, bias.astype(jnp.float32), 0) / zimg.shape[0]


def gathered_loss(zi, zt, log_t, bias, *, axis):
    """All-gather the texts; this device's b images against all B of them."""
    axes = axis_tuple(axis)
    t = jnp.exp(log_t.astype(jnp.float32))
    b = zi.shape[0]
    zt_all = jax.lax.all_gather(zt, axes, axis=0, tiled=True)
    local = _sigmoid_block_sum(zi, zt_all, t, bias.astype(jnp.float32), jax.lax.axis_index(axes) * b)
    return jax.lax.psum(local, axes) / zt_all.shape[0]


# --------------------------------------------------------------------------- ring


def _sigmoid_block(zi, zc, t, bias, offset, tile, axes, scale=None):
    """Loss only (scale=None): Σ softplus(−ℓ·x) over the block, x = t·zi·zcᵀ + b,
    ℓ = +1 where column == row + offset. With gradients: with
    G = scale·(−ℓ·σ(−ℓ·x)), returns (t·G·zc, t·Gᵀ·zi, Σ G∘(x − b), Σ G,
    Σ softplus(−ℓ·x))."""
    b, d = zi.shape
    rows0 = jnp.arange(tile)

    def row_tile(carry, xs):
        zi_r, r = xs

        def col_tile(inner, ys):
            zc_c, c = ys
            s = t * dot_t(zi_r, zc_c)
            x = s + bias
            rows = r * tile + rows0[:, None]
            cols = c * tile + rows0[None, :]
            sign = jnp.where(cols == rows + offset, 1.0, -1.0)
            if scale is None:
                return inner + jnp.sum(jax.nn.softplus(-sign * x)), None
            dzi_r, dlt, db, total = inner
            g = -scale * sign * jax.nn.sigmoid(-sign * x)
            new = (dzi_r + t * dot(g.astype(zc_c.dtype), zc_c), dlt + jnp.sum(g * s), db + jnp.sum(g),
                   total + jnp.sum(jax.nn.softplus(-sign * x)))
            return new, t * dot(g.T.astype(zi_r.dtype), zi_r)

        if scale is None:
            total, _ = jax.lax.scan(col_tile, carry, (tiles(zc, tile), jnp.arange(b // tile)))
            return total, None
        dzc, dlt, db, total = carry
        zero = varying(jnp.zeros((tile, d), jnp.float32), axes)
        (dzi_r, dlt, db, total), dzc_parts = jax.lax.scan(col_tile, (zero, dlt, db, total),
                                                          (tiles(zc, tile), jnp.arange(b // tile)))
        return (dzc + dzc_parts.reshape(b, d), dlt, db, total), dzi_r

    xs = (tiles(zi, tile), jnp.arange(b // tile))
    zero_s = varying(jnp.zeros((), jnp.float32), axes)
    if scale is None:
        total, _ = jax.lax.scan(row_tile, zero_s, xs)
        return total
    zero_dz = varying(jnp.zeros((b, d), jnp.float32), axes)
    (dzc, dlt, db, total), dzi = jax.lax.scan(row_tile, (zero_dz, zero_s, zero_s, zero_s), xs)
    return dzi.reshape(b, d), dzc, dlt, db, total


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def ring_loss(zi, zt, log_t, bias, axes: Sequence[str], n: int, tile: int):
    """The global loss; zi, zt are this device's rows (the texts travel the ring)."""
    t = jnp.exp(log_t.astype(jnp.float32))
    bias32 = bias.astype(jnp.float32)
    b = zi.shape[0]
    me = jax.lax.axis_index(tuple(axes))

    def step(k, carry):
        zc, total = carry
        offset = (me - (me - k) % n) * b  # the chunk came from device (me − k) mod n
        return shift(zc, axes, n), total + _sigmoid_block(zi, zc, t, bias32, offset, tile, axes)

    zc, total = jax.lax.fori_loop(0, n - 1, step, (zt, varying(jnp.zeros((), jnp.float32), axes)))
    total = total + _sigmoid_block(zi, zc, t, bias32, (me - (me - (n - 1)) % n) * b, tile, axes)
    return jax.lax.psum(total, axes) / (b * n)


def _sigmoid_ring_fwd(zi, zt, log_t, bias, axes, n, tile):
    """The loss and its gradients at cotangent 1, in one pass of the ring;
    the residuals are the (b × d) gradients and two scalars."""
    t = jnp.exp(log_t.astype(jnp.float32))
    bias32 = bias.astype(jnp.float32)
    b, d = zi.shape
    scale = 1.0 / (b * n)
    me = jax.lax.axis_index(tuple(axes))

    def step(k, carry):
        zc, dzc, dzi, dlt, db, total = carry
        offset = (me - (me - k) % n) * b
        gi, gc, gl, gb, s = _sigmoid_block(zi, zc, t, bias32, offset, tile, axes, scale)
        return shift(zc, axes, n), shift(dzc + gc, axes, n), dzi + gi, dlt + gl, db + gb, total + s

    zeros = varying(jnp.zeros((b, d), jnp.float32), axes)
    zero = varying(jnp.zeros((), jnp.float32), axes)
    zc, dzc, dzi, dlt, db, total = jax.lax.fori_loop(0, n - 1, step, (zt, zeros, zeros, zero, zero, zero))
    gi, gc, gl, gb, s = _sigmoid_block(zi, zc, t, bias32, (me - (me - (n - 1)) % n) * b, tile, axes, scale)
    dzt = shift(dzc + gc, axes, n)
    loss = jax.lax.psum(total + s, axes) / (b * n)
    grads = (dzi + gi, dzt, jax.lax.psum(dlt + gl, axes), jax.lax.psum(db + gb, axes))
    dtypes = tuple(jnp.zeros((0,), x.dtype) for x in (zi, zt, log_t, bias))  # empty: the inputs' dtypes only
    return loss, (grads, dtypes)


def _sigmoid_ring_bwd(axes, n, tile, res, ct):
    grads, dtypes = res
    return tuple((ct * g).astype(like.dtype) for g, like in zip(grads, dtypes))


ring_loss.defvjp(_sigmoid_ring_fwd, _sigmoid_ring_bwd)


# --------------------------------------------------------------------------- keyed: positives by key equality
#
# The region–word form of the same loss: rows (regions) and columns (phrases)
# come with integer keys and 0/1 weights; ℓ_ij = +1 where the keys are equal,
# −1 elsewhere, and every term is weighted by w_i·w_j. The sum is divided by
# the global Σ_i w_i (the number of real rows). Rows and columns may differ in
# number; the columns travel the ring with their keys and weights.


def _keyed_terms(zi, ki, wi, zc, kc, wc, t, bias):
    """(s = t·zi·zcᵀ, x = s + b, ℓ, w_i·w_j) of one block."""
    s = t * dot_t(zi, zc)
    sign = jnp.where(ki[:, None] == kc[None, :], 1.0, -1.0)
    return s, s + bias, sign, wi[:, None] * wc[None, :]


def keyed_dense_sum(zi, ki, wi, zc, kc, wc, log_t, bias):
    """Σ_ij w_i w_j softplus(−ℓ_ij x_ij) over the arrays as given (autodiff)."""
    _, x, sign, w = _keyed_terms(zi, ki, wi, zc, kc, wc, jnp.exp(log_t.astype(jnp.float32)),
                                 bias.astype(jnp.float32))
    return jnp.sum(w * jax.nn.softplus(-sign * x))


def keyed_gathered_loss(zi, ki, wi, zc, kc, wc, log_t, bias, *, axis):
    """All-gather the columns; this device's rows against all of them."""
    axes = axis_tuple(axis)
    gather = lambda x: jax.lax.all_gather(x, axes, axis=0, tiled=True)  # noqa: E731
    local = keyed_dense_sum(zi, ki, wi, gather(zc), gather(kc), gather(wc), log_t, bias)
    return jax.lax.psum(local, axes) / jnp.maximum(jax.lax.psum(jnp.sum(wi), axes), 1.0)


def _keyed_block(rows, cols, t, bias, tiles_rc, axes, scale=None):
    """Loss only (scale=None): Σ w·softplus(−ℓ·x) over the block of ``rows`` =
    (z, k, w) against ``cols``, in (tr × tc) pieces. With gradients: with
    G = scale·w·(−ℓ·σ(−ℓ·x)), returns (t·G·zc, t·Gᵀ·zi, Σ G∘s, Σ G,
    Σ w·softplus(−ℓ·x))."""
    (zi, ki, wi), (zc, kc, wc) = rows, cols
    tr, tc = tiles_rc
    m, d = zi.shape
    col_xs = (tiles(zc, tc), tiles(kc, tc), tiles(wc, tc))

    def row_tile(carry, xs):
        zi_r, ki_r, wi_r = xs

        def col_tile(inner, ys):
            zc_c, kc_c, wc_c = ys
            s, x, sign, w = _keyed_terms(zi_r, ki_r, wi_r, zc_c, kc_c, wc_c, t, bias)
            if scale is None:
                return inner + jnp.sum(w * jax.nn.softplus(-sign * x)), None
            dzi_r, dlt, db, total = inner
            g = -scale * w * sign * jax.nn.sigmoid(-sign * x)
            new = (dzi_r + t * dot(g.astype(zc_c.dtype), zc_c), dlt + jnp.sum(g * s), db + jnp.sum(g),
                   total + jnp.sum(w * jax.nn.softplus(-sign * x)))
            return new, t * dot(g.T.astype(zi_r.dtype), zi_r)

        if scale is None:
            return jax.lax.scan(col_tile, carry, col_xs)[0], None
        dzc, dlt, db, total = carry
        zero = varying(jnp.zeros((tr, d), jnp.float32), axes)
        (dzi_r, dlt, db, total), dzc_parts = jax.lax.scan(col_tile, (zero, dlt, db, total), col_xs)
        return (dzc + dzc_parts.reshape(zc.shape), dlt, db, total), dzi_r

    row_xs = (tiles(zi, tr), tiles(ki, tr), tiles(wi, tr))
    zero_s = varying(jnp.zeros((), jnp.float32), axes)
    if scale is None:
        return jax.lax.scan(row_tile, zero_s, row_xs)[0]
    zero_dz = varying(jnp.zeros(zc.shape, jnp.float32), axes)
    (dzc, dlt, db, total), dzi = jax.lax.scan(row_tile, (zero_dz, zero_s, zero_s, zero_s), row_xs)
    return dzi.reshape(m, d), dzc, dlt, db, total


def _keyed_count(wi, axes):
    return jnp.maximum(jax.lax.psum(jnp.sum(wi.astype(jnp.float32)), axes), 1.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def keyed_ring_loss(zi, ki, wi, zc, kc, wc, log_t, bias, axes: Sequence[str], n: int, tiles_rc: tuple[int, int]):
    """The global keyed loss; (zi, ki, wi) are this device's rows, the columns
    (zc, kc, wc) travel the ring. Keys and weights get no gradient."""
    t = jnp.exp(log_t.astype(jnp.float32))
    bias32 = bias.astype(jnp.float32)
    rows = (zi, ki, wi)

    def step(_, carry):
        cols, total = carry
        return _shift_all(cols, axes, n), total + _keyed_block(rows, cols, t, bias32, tiles_rc, axes)

    cols, total = jax.lax.fori_loop(0, n - 1, step, ((zc, kc, wc), varying(jnp.zeros((), jnp.float32), axes)))
    total = total + _keyed_block(rows, cols, t, bias32, tiles_rc, axes)
    return jax.lax.psum(total, axes) / _keyed_count(wi, axes)


def _shift_all(xs, axes, n):
    return tuple(shift(x, axes, n) for x in xs)


def _keyed_ring_fwd(zi, ki, wi, zc, kc, wc, log_t, bias, axes, n, tiles_rc):
    """The loss and its gradients at cotangent 1 in one pass (as ``ring_loss``)."""
    t = jnp.exp(log_t.astype(jnp.float32))
    bias32 = bias.astype(jnp.float32)
    count = _keyed_count(wi, axes)
    rows = (zi, ki, wi)

    def step(_, carry):
        cols, dzc, dzi, dlt, db, total = carry
        gi, gc, gl, gb, s = _keyed_block(rows, cols, t, bias32, tiles_rc, axes, 1.0 / count)
        return _shift_all(cols, axes, n), shift(dzc + gc, axes, n), dzi + gi, dlt + gl, db + gb, total + s

    zero = varying(jnp.zeros((), jnp.float32), axes)
    init = ((zc, kc, wc), varying(jnp.zeros(zc.shape, jnp.float32), axes),
            varying(jnp.zeros(zi.shape, jnp.float32), axes), zero, zero, zero)
    cols, dzc, dzi, dlt, db, total = jax.lax.fori_loop(0, n - 1, step, init)
    gi, gc, gl, gb, s = _keyed_block(rows, cols, t, bias32, tiles_rc, axes, 1.0 / count)
    loss = jax.lax.psum(total + s, axes) / count
    grads = (dzi + gi, shift(dzc + gc, axes, n), jax.lax.psum(dlt + gl, axes), jax.lax.psum(db + gb, axes))
    dtypes = tuple(jnp.zeros((0,), x.dtype) for x in (zi, zc, log_t, bias))  # empty: the inputs' dtypes only
    return loss, (grads, dtypes, (ki, wi, kc, wc))  # keys and weights: O(rows), for their cotangents' shapes


def _keyed_ring_bwd(axes, n, tiles_rc, res, ct):
    (dzi, dzc, dlt, db), (zi, zc, log_t, bias), (ki, wi, kc, wc) = res
    none = lambda x: np.zeros(x.shape, jax.dtypes.float0)  # noqa: E731  (integer keys: no cotangent)
    return ((ct * dzi).astype(zi.dtype), none(ki), jnp.zeros_like(wi), (ct * dzc).astype(zc.dtype), none(kc),
            jnp.zeros_like(wc), (ct * dlt).astype(log_t.dtype), (ct * db).astype(bias.dtype))


keyed_ring_loss.defvjp(_keyed_ring_fwd, _keyed_ring_bwd)
