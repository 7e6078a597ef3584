"""One engine for every softmax (InfoNCE-type) contrastive objective.

An objective is described by an ``InfoNCESpec``:
  * a similarity ``sim(log_t, a, c) -> (x_row, x_col)``: the logits of a block
    of rows a against columns c, for the row direction (a → c) and for the
    column direction (c → a, stored transposed as [a, c]); for CLIP both are
    t·z^I_a·z^T_c, for FILIP they are the two token-wise similarities;
  * integer labels on both sides: (a, c) is a positive pair when the labels
    are equal (CLIP: the global row index; UniCL: the class);
  * optional ids on both sides: (a, c) with equal ids is excluded from the
    softmax altogether (SLIP: an anchor is not its own negative);
  * whether the column direction is a loss term of its own (``both``);
  * optionally (``weighted``) a weight w ≥ 0 per row and per column.

For every row a: ℓ_a = logsumexp_{c not excluded} x_row[a, c] − mean_{c ∈ P(a)} x_row[a, c],
and likewise for every column when ``both``; the loss is the sum of all terms
divided by ``denom``. Weighted: ℓ_a = log Σ_{c not excluded} w_c exp(x_row[a, c])
− mean_{c ∈ P(a)} x_row[a, c], the terms summed with weights w_a (w_c for the
columns' terms) and divided by the global sum of those weights; a weight of 0
removes an example exactly (neither anchor nor negative), unit weights give
the unweighted loss.

Two implementations, both per-device bodies for ``shard_map`` over ``axes``:
``gathered`` (all_gather the column side, autodiff; the baseline) and
``ring`` (a custom VJP: the column chunk travels the ring with its column
statistics; only O(b) statistics are saved; each block is recomputed once in
the backward, where ``jax.vjp`` of ``sim`` on the block gives the gradients and
the chunk's gradient accumulator travels home with it). ``tile`` splits each
block into tile × tile pieces so no b × b block is ever materialised.

CLIP, the case every training run uses, also has two hand-written bodies of
its own: ``clip_dense_loss`` (the formula on the arrays as given, one B×B
logit matrix) and ``clip_gathered_loss`` (all_gather of both modalities, each
device scoring its b rows of both directions against all B columns).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from vlm_jax.losses.ring import axis_tuple, dot_t, shift, tiles, varying

NEG_INF = -jnp.inf
SimFn = Callable[[jax.Array, Any, Any], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class InfoNCESpec:
    """The static description of an objective (hashable: a custom_vjp argument)."""

    sim: SimFn
    both: bool  # the column direction is a loss term of its own
    exclude: bool  # pairs with equal ids are left out of the softmax
    denom: int  # global normaliser of the summed terms (unweighted)
    weighted: bool = False  # per-row and per-column weights (wa, wc) are given


def _pair_masks(spec: InfoNCESpec, la, ia, lc, ic, wa=None, wc=None):
    pos = la[:, None] == lc[None, :]
    if spec.weighted:  # a weight-0 example is nobody's positive either
        pos = pos & (wa[:, None] > 0) & (wc[None, :] > 0)
    if spec.exclude:
        excluded = ia[:, None] == ic[None, :]
        return pos & ~excluded, excluded
    return pos, None


def _masked(x, excluded):
    return x if excluded is None else jnp.where(excluded, NEG_INF, x)


def _log_w(w):
    return jnp.log(w.astype(jnp.float32))  # log 0 = −inf: a weight-0 example is no negative


def _partition_x(spec, x_row, x_col, wa, wc):
    """The logits that enter the log-sum-exp: x + log w of the other side when weighted."""
    if not spec.weighted:
        return x_row, x_col
    return x_row + _log_w(wc)[None, :], x_col + _log_w(wa)[:, None]


def _terms(spec, x_row, x_col, la, ia, lc, ic, axis_rows: bool, wa=None, wc=None):
    """Per-row (axis_rows) or per-column softmax statistics of one block:
    (log-sum-exp over non-excluded pairs, Σ positives·x, number of positives)."""
    pos, excluded = _pair_masks(spec, la, ia, lc, ic, wa, wc)
    posf = pos.astype(jnp.float32)
    ax = 1 if axis_rows else 0
    x = x_row if axis_rows else x_col
    xp = _partition_x(spec, x_row, x_col, wa, wc)[0 if axis_rows else 1]
    return jax.nn.logsumexp(_masked(xp, excluded), axis=ax), jnp.sum(posf * x, axis=ax), jnp.sum(posf, axis=ax)


def _merge(s, t):
    return jnp.logaddexp(s[0], t[0]), s[1] + t[1], s[2] + t[2]


def _empty_stats(rows: int, axes):
    return (
        varying(jnp.full((rows,), NEG_INF, jnp.float32), axes),
        varying(jnp.zeros((rows,), jnp.float32), axes),
        varying(jnp.zeros((rows,), jnp.float32), axes),
    )


def _tree_tiles(tree, tile):
    return jax.tree_util.tree_map(lambda x: tiles(x, tile), tree)


def _rows(tree) -> int:
    return jax.tree_util.tree_leaves(tree)[0].shape[0]


# --------------------------------------------------------------------------- ring forward


def _block_stats(spec, log_t, a, la, ia, c, lc, ic, tile, axes, wa=None, wc=None):
    """Row statistics of a's rows and column statistics of c's rows over one
    (a × c) block, in tile × tile pieces (wa, wc: the weights, when ``spec.weighted``)."""
    ra, rc = _rows(a), _rows(c)

    def row_tile(col_stats, xs):
        a_t, la_t, ia_t, wa_t = xs

        def col_tile(row_stats, ys):
            c_t, lc_t, ic_t, wc_t = ys
            x_row, x_col = spec.sim(log_t, a_t, c_t)
            row = _terms(spec, x_row, x_col, la_t, ia_t, lc_t, ic_t, True, wa_t, wc_t)
            col = _terms(spec, x_row, x_col, la_t, ia_t, lc_t, ic_t, False, wa_t, wc_t) if spec.both else None
            return _merge(row_stats, row), col

        row_stats, col_parts = jax.lax.scan(
            col_tile, _empty_stats(tile, axes),
            (_tree_tiles(c, tile), tiles(lc, tile), tiles(ic, tile), _tree_tiles(wc, tile))
        )
        if spec.both:
            col_stats = _merge(col_stats, tuple(p.reshape(rc) for p in col_parts))
        return col_stats, row_stats

    col_stats, row_stats = jax.lax.scan(
        row_tile, _empty_stats(rc, axes),
        (_tree_tiles(a, tile), tiles(la, tile), tiles(ia, tile), _tree_tiles(wa, tile))
    )
    return tuple(s.reshape(ra) for s in row_stats), col_stats


def _ring_stats(spec, log_t, a, la, ia, c, lc, ic, wa, wc, axes, n, tile):
    def step(_, carry):
        chunk, lc_k, ic_k, wc_k, col_k, row = carry
        r, cs = _block_stats(spec, log_t, a, la, ia, chunk, lc_k, ic_k, tile, axes, wa, wc_k)
        col_k = _merge(col_k, cs)
        move = functools.partial(shift, axes=axes, n=n)
        return jax.tree_util.tree_map(move, (chunk, lc_k, ic_k, wc_k, col_k)) + (_merge(row, r),)

    init = (c, lc, ic, wc, _empty_stats(_rows(c), axes), _empty_stats(_rows(a), axes))
    chunk, lc_k, ic_k, wc_k, col_k, row = jax.lax.fori_loop(0, n - 1, step, init)
    r, cs = _block_stats(spec, log_t, a, la, ia, chunk, lc_k, ic_k, tile, axes, wa, wc_k)
    # The chunk now here came from the next device; its column statistics go home.
    col_home = jax.tree_util.tree_map(lambda s: shift(s, axes, n), _merge(col_k, cs))
    return _merge(row, r), col_home


def _denominator(spec, wa, wc, axes):
    """The global normaliser: ``spec.denom``, or the sum of the terms' weights."""
    if not spec.weighted:
        return spec.denom
    total = jnp.sum(wa.astype(jnp.float32)) + (jnp.sum(wc.astype(jnp.float32)) if spec.both else 0.0)
    return jnp.maximum(jax.lax.psum(total, axes), 1e-30)


def _weighted_sum(terms, w):
    """Σ terms, each times its weight when given (a weight-0 term is 0 whatever its value)."""
    if w is None:
        return jnp.sum(terms)
    w = w.astype(jnp.float32)
    return jnp.sum(jnp.where(w > 0, w * terms, 0.0))


def _loss_from_stats(spec, row, col, axes, wa=None, wc=None):
    def term(stats, w):
        lse, possum, cnt = stats
        return _weighted_sum(lse - possum / jnp.maximum(cnt, 1.0), w)

    local = term(row, wa) + (term(col, wc) if spec.both else 0.0)
    return jax.lax.psum(local, axes) / _denominator(spec, wa, wc, axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11, 12))
def ring_loss(log_t, a, la, ia, c, lc, ic, wa, wc, spec: InfoNCESpec, axes: tuple[str, ...], n: int, tile: int):
    """The objective's global loss; a, la, ia (wa) are this device's rows, c, lc,
    ic (wc) its share of the columns (which travel the ring). wa, wc: None
    unless ``spec.weighted``; they get no gradient."""
    return _ring_fwd(log_t, a, la, ia, c, lc, ic, wa, wc, spec, axes, n, tile)[0]


def _ring_fwd(log_t, a, la, ia, c, lc, ic, wa, wc, spec, axes, n, tile):
    row, col = _ring_stats(spec, log_t, a, la, ia, c, lc, ic, wa, wc, axes, n, tile)
    loss = _loss_from_stats(spec, row, col, axes, wa, wc)
    return loss, (log_t, a, la, ia, c, lc, ic, wa, wc, row[0], row[2], col[0], col[2])


# --------------------------------------------------------------------------- ring backward


def _block_grads(spec, log_t_v, a, la, ia, c, lc, ic, row_lse, row_cnt, col_lse, col_cnt, scale, tile, axes,
                 wa=None, wc=None):
    """(d log_t, d a, d c) of one block: G_row = scale·(softmax_row − P/|P(a)|),
    G_col likewise over columns (weighted: the softmax over w·exp(x), each row
    of G_row times w_a, each column of G_col times w_c), pulled back through
    ``sim`` with jax.vjp."""
    ra = _rows(a)
    zeros_like = lambda tree: jax.tree_util.tree_map(  # noqa: E731
        lambda x: varying(jnp.zeros(x.shape, jnp.float32), axes), tree)

    def row_tile(carry, xs):
        dlt, dc = carry
        a_t, la_t, ia_t, rl_t, rn_t, wa_t = xs

        def col_tile(inner, ys):
            dlt, da_t = inner
            c_t, lc_t, ic_t, cl_t, cn_t, wc_t = ys
            (x_row, x_col), pull = jax.vjp(lambda lt, p, q: spec.sim(lt, p, q), log_t_v, a_t, c_t)
            pos, excluded = _pair_masks(spec, la_t, ia_t, lc_t, ic_t, wa_t, wc_t)
            posf = pos.astype(jnp.float32)
            xp_row, xp_col = _partition_x(spec, x_row, x_col, wa_t, wc_t)
            g_row = scale * (jnp.exp(_masked(xp_row, excluded) - rl_t[:, None]) - posf / jnp.maximum(rn_t, 1.0)[:, None])
            if spec.weighted:
                g_row = jnp.where(wa_t[:, None] > 0, wa_t[:, None] * g_row, 0.0)
            if spec.both:
                g_col = scale * (jnp.exp(_masked(xp_col, excluded) - cl_t[None, :]) - posf / jnp.maximum(cn_t, 1.0)[None, :])
                if spec.weighted:
                    g_col = jnp.where(wc_t[None, :] > 0, wc_t[None, :] * g_col, 0.0)
            else:
                g_col = jnp.zeros_like(x_col)
            g_lt, g_a, g_c = pull((g_row, g_col))
            da_t = jax.tree_util.tree_map(lambda u, v: u + v.astype(jnp.float32), da_t, g_a)
            return (dlt + g_lt, da_t), g_c

        (dlt, da_t), dc_parts = jax.lax.scan(
            col_tile, (dlt, zeros_like(a_t)),
            (_tree_tiles(c, tile), tiles(lc, tile), tiles(ic, tile), tiles(col_lse, tile), tiles(col_cnt, tile),
             _tree_tiles(wc, tile)),
        )
        dc = jax.tree_util.tree_map(lambda u, v: u + v.reshape(u.shape).astype(jnp.float32), dc, dc_parts)
        return (dlt, dc), da_t

    (dlt, dc), da = jax.lax.scan(
        row_tile, (varying(jnp.zeros((), jnp.float32), axes), zeros_like(c)),
        (_tree_tiles(a, tile), tiles(la, tile), tiles(ia, tile), tiles(row_lse, tile), tiles(row_cnt, tile),
         _tree_tiles(wa, tile)),
    )
    return dlt, jax.tree_util.tree_map(lambda x: x.reshape(ra, *x.shape[2:]), da), dc


def _ring_bwd(spec, axes, n, tile, res, ct):
    log_t, a, la, ia, c, lc, ic, wa, wc, row_lse, row_cnt, col_lse, col_cnt = res
    scale = ct / _denominator(spec, wa, wc, axes)
    # A device-local copy of log_t: its per-block cotangents are summed once at the end.
    log_t_v = varying(log_t.astype(jnp.float32), axes)
    move = functools.partial(shift, axes=axes, n=n)
    add = lambda u, v: jax.tree_util.tree_map(jnp.add, u, v)  # noqa: E731

    def step(_, carry):
        chunk, lc_k, ic_k, wc_k, cl_k, cn_k, dc_k, da, dlt = carry
        g_lt, g_a, g_c = _block_grads(spec, log_t_v, a, la, ia, chunk, lc_k, ic_k, row_lse, row_cnt, cl_k, cn_k, scale,
                                      tile, axes, wa, wc_k)
        moved = jax.tree_util.tree_map(move, (chunk, lc_k, ic_k, wc_k, cl_k, cn_k, add(dc_k, g_c)))
        return moved + (add(da, g_a), dlt + g_lt)

    zeros = lambda tree: jax.tree_util.tree_map(  # noqa: E731
        lambda x: varying(jnp.zeros(x.shape, jnp.float32), axes), tree)
    init = (c, lc, ic, wc, col_lse, col_cnt, zeros(c), zeros(a), varying(jnp.zeros((), jnp.float32), axes))
    chunk, lc_k, ic_k, wc_k, cl_k, cn_k, dc_k, da, dlt = jax.lax.fori_loop(0, n - 1, step, init)
    g_lt, g_a, g_c = _block_grads(spec, log_t_v, a, la, ia, chunk, lc_k, ic_k, row_lse, row_cnt, cl_k, cn_k, scale,
                                  tile, axes, wa, wc_k)
    dc = jax.tree_util.tree_map(move, add(dc_k, g_c))
    da = add(da, g_a)
    cast = lambda d, x: jax.tree_util.tree_map(lambda u, v: u.astype(v.dtype), d, x)  # noqa: E731
    no_grad = lambda w: None if w is None else jnp.zeros_like(w)  # noqa: E731
    return (jax.lax.psum(dlt + g_lt, axes).astype(log_t.dtype), cast(da, a), None, None, cast(dc, c), None, None,
            no_grad(wa), no_grad(wc))


ring_loss.defvjp(_ring_fwd, _ring_bwd)


# --------------------------------------------------------------------------- gathered (baseline)


def gathered_loss(log_t, a, la, ia, c, lc, ic, wa, wc, spec: InfoNCESpec, axes: tuple[str, ...]):
    """All-gather both sides and differentiate with autodiff: each device scores
    its rows against all columns and (when ``both``) its columns against all rows;
    gradients flow back through the gathers to the owning device."""
    gather = lambda tree: jax.tree_util.tree_map(  # noqa: E731
        lambda x: jax.lax.all_gather(x, axes, axis=0, tiled=True), tree)
    c_all, lc_all, ic_all, wc_all = gather((c, lc, ic, wc))
    x_row, x_col = spec.sim(log_t, a, c_all)
    local = _loss_terms(spec, x_row, x_col, la, ia, lc_all, ic_all, True, wa, wc_all)
    if spec.both:
        a_all, la_all, ia_all, wa_all = gather((a, la, ia, wa))
        x_row, x_col = spec.sim(log_t, a_all, c)
        local = local + _loss_terms(spec, x_row, x_col, la_all, ia_all, lc, ic, False, wa_all, wc)
    return jax.lax.psum(local, axes) / _denominator(spec, wa, wc, axes)


def _loss_terms(spec, x_row, x_col, la, ia, lc, ic, axis_rows, wa=None, wc=None):
    lse, possum, cnt = _terms(spec, x_row, x_col, la, ia, lc, ic, axis_rows, wa, wc)
    return _weighted_sum(lse - possum / jnp.maximum(cnt, 1.0), wa if axis_rows else wc)


# --------------------------------------------------------------------------- CLIP, hand-written


def clip_dense_loss(zimg, ztxt, log_t):
    """CLIP's formula on the arrays as given: one (B, B) logit matrix."""
    t = jnp.exp(log_t.astype(jnp.float32))
    logits = t * dot_t(zimg, ztxt)  # (B, B)
    diag = jnp.diagonal(logits)
    l_i2t = jax.nn.logsumexp(logits, axis=1) - diag
    l_t2i = jax.nn.logsumexp(logits, axis=0) - diag
    return 0.5 * (l_i2t.mean() + l_t2i.mean())


def clip_gathered_loss(zi, zt, log_t, *, axis):
    """CLIP per device: gather both modalities, score this device's b rows of
    both directions against all B columns, autodiff for the backward."""
    axes = axis_tuple(axis)
    t = jnp.exp(log_t.astype(jnp.float32))
    b = zi.shape[0]
    # Gradients flow back through all_gather (its transpose is a
    # reduce-scatter), so each device receives the full gradient of its rows.
    zi_all = jax.lax.all_gather(zi, axes, axis=0, tiled=True)
    zt_all = jax.lax.all_gather(zt, axes, axis=0, tiled=True)
    rows = jnp.arange(b)
    cols = jax.lax.axis_index(axes) * b + rows
    logits_i2t = t * dot_t(zi, zt_all)  # (b, B): my images vs all texts
    logits_t2i = t * dot_t(zt, zi_all)  # (b, B): my texts vs all images
    pos = logits_i2t[rows, cols]  # t·z^I_i·z^T_i, the same in both directions
    local = jnp.sum(jax.nn.logsumexp(logits_i2t, axis=1) + jax.nn.logsumexp(logits_t2i, axis=1) - 2.0 * pos)
    return jax.lax.psum(local, axes) / (2.0 * zi_all.shape[0])
