"""Contrastive image–text losses with negatives from every device.

Notation: z^I_i, z^T_j are L2-normalised image and text embeddings (rows of
``zimg``, ``ztxt``; shape (B, d) globally, b = B/N rows on each of the N
devices of ``axis``); t = exp(log_t) is the inverse temperature (1/τ); b is
the sigmoid bias. Every function returns the loss of the *global* batch as a
float32 scalar and is differentiable in zimg, ztxt, log_t and bias with
gradients equal to those of the single-device formula.

With ``mesh=None`` the formula is evaluated on the arrays as given (under jit on
globally sharded arrays XLA then materialises the B×B logits where it likes:
the ``global_logits`` baseline). With a mesh, the chosen ``impl`` runs inside
``jax.shard_map`` over ``axis``.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from vlm_jax.losses import blockwise, infonce

Axis = str | Sequence[str]


def _dot_t(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b.T with float32 accumulation whatever the input dtype."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _axis_tuple(axis: Axis) -> tuple[str, ...]:
    return (axis,) if isinstance(axis, str) else tuple(axis)


DEFAULT_MAX_TILE = 512


def axis_devices(mesh: Mesh, axis: Axis) -> int:
    """Number of devices along ``axis`` (a name or a tuple of names)."""
    return int(np.prod([mesh.shape[a] for a in _axis_tuple(axis)]))


def auto_tile(rows: int) -> int:
    """The largest divisor of ``rows`` up to DEFAULT_MAX_TILE."""
    return max(t for t in range(1, min(rows, DEFAULT_MAX_TILE) + 1) if rows % t == 0)


def _check_inputs(zimg: jax.Array, ztxt: jax.Array, mesh: Mesh | None, axis: Axis) -> None:
    if zimg.ndim != 2 or zimg.shape != ztxt.shape:
        raise ValueError(f"zimg and ztxt must both have shape (B, d); got {zimg.shape} and {ztxt.shape}")
    if mesh is not None:
        axes = _axis_tuple(axis)
        missing = [a for a in axes if a not in mesh.shape]
        if missing:
            raise ValueError(f"loss axis {missing} not in mesh axes {tuple(mesh.shape)}")
        n = axis_devices(mesh, axes)
        if zimg.shape[0] % n:
            raise ValueError(
                f"global batch B={zimg.shape[0]} is not divisible by the {n} devices of mesh axis {axis!r}"
            )


def _mesh_for(impl: str, mesh: Mesh | None, axis: Axis) -> tuple[Mesh | None, Axis]:
    """Memory-linear impls without a mesh run on a one-device mesh (so that a
    single accelerator gets the same O(b·d) memory), the others densely."""
    if mesh is None and impl in ("ring", "tiled"):
        return Mesh(np.asarray(jax.devices()[:1]), ("data",)), "data"
    return mesh, axis


def _tile_kw(impl: str, zimg: jax.Array, mesh: Mesh, axis: Axis, tile: int | None) -> dict:
    if impl != "tiled":
        if tile is not None:
            raise ValueError(f"tile={tile} applies to impl='tiled' only, not {impl!r}")
        return {}
    b = zimg.shape[0] // axis_devices(mesh, axis)
    return {"tile": blockwise.check_tile(b, auto_tile(b) if tile is None else tile)}


def _sharded(local_fn: Callable, mesh: Mesh, axis: Axis, n_sharded: int, n_replicated: int) -> Callable:
    spec = P(_axis_tuple(axis))
    return jax.shard_map(
        local_fn,
        mesh=mesh,
        in_specs=(spec,) * n_sharded + (P(),) * n_replicated,
        out_specs=P(),
    )


# --------------------------------------------------------------------------- softmax


def _softmax_dense(zimg, ztxt, log_t):
    t = jnp.exp(log_t.astype(jnp.float32))
    logits = t * _dot_t(zimg, ztxt)  # (B, B)
    diag = jnp.diagonal(logits)
    l_i2t = jax.nn.logsumexp(logits, axis=1) - diag
    l_t2i = jax.nn.logsumexp(logits, axis=0) - diag
    return 0.5 * (l_i2t.mean() + l_t2i.mean())


def _softmax_all_gather_local(zi, zt, log_t, *, axis):
    axes = _axis_tuple(axis)
    t = jnp.exp(log_t.astype(jnp.float32))
    b = zi.shape[0]
    # Gradients flow back through all_gather (its transpose is a
    # reduce-scatter), so each device receives the full gradient of its rows.
    zi_all = jax.lax.all_gather(zi, axes, axis=0, tiled=True)
    zt_all = jax.lax.all_gather(zt, axes, axis=0, tiled=True)
    rows = jnp.arange(b)
    cols = jax.lax.axis_index(axes) * b + rows
    logits_i2t = t * _dot_t(zi, zt_all)  # (b, B): my images vs all texts
    logits_t2i = t * _dot_t(zt, zi_all)  # (b, B): my texts vs all images
    pos = logits_i2t[rows, cols]  # t·z^I_i·z^T_i, the same in both directions
    local = jnp.sum(jax.nn.logsumexp(logits_i2t, axis=1) + jax.nn.logsumexp(logits_t2i, axis=1) - 2.0 * pos)
    return jax.lax.psum(local, axes) / (2.0 * zi_all.shape[0])


def softmax_loss(
    zimg: jax.Array,
    ztxt: jax.Array,
    log_t: jax.Array,
    *,
    impl: str = "all_gather",
    mesh: Mesh | None = None,
    axis: Axis = "data",
    tile: int | None = None,
) -> jax.Array:
    r"""CLIP softmax InfoNCE over the global batch.

    L = ½ (L_{I→T} + L_{T→I}),
    L_{I→T} = −(1/B) Σ_i log [ exp(t·z^I_i·z^T_i) / Σ_j exp(t·z^I_i·z^T_j) ],
    L_{T→I} = −(1/B) Σ_i log [ exp(t·z^T_i·z^I_i) / Σ_j exp(t·z^T_i·z^I_j) ].

    impl="all_gather": each device gathers both modalities (B×d each) and
    computes its b rows of each direction against all B columns.
      memory per device: 2·B·d gathered embeddings + 2·b·B float32 logits
      (kept for the backward pass);
      communication per device: all_gather of both modalities, 2·(N−1)·b·d
      elements forward and the same again as reduce-scatter backward;
      FLOPs: 2 directions × 2·b·B·d forward, about twice that backward
      (≈ 12·B²·d summed over devices).
    impl="ring": the texts travel the ring of N devices (ppermute); one pass
    over each b×b block gives the partial log-sum-exp of its rows (I→T) and of
    its columns (T→I); the column partials travel with their chunk and arrive
    home after the last step. A custom VJP keeps only the two LSE vectors and
    recomputes each block once in the backward, where the chunk's gradient
    accumulator travels the ring with it.
      memory per device: O(b·d) (chunk, accumulators) + one b×b block in flight,
      independent of N;
      communication per device: (N−1)·b·d forward, 2·(N−1)·b·d + N·b·d
      backward (chunk, its LSE and its gradient), overlappable with compute;
      FLOPs: ≈ 8·B²·d in all (2 forward, 6 backward).
    impl="tiled": as "ring", with each block processed in tile×tile pieces,
      so memory per device is O(b·d + tile²); ``tile`` must divide b
      (default: the largest divisor of b up to 512).
    With ``mesh=None``: the dense formula, one B×B logit matrix ("ring" and
    "tiled" then run on a one-device mesh).
    """
    if impl not in _SOFTMAX_IMPLS:
        raise ValueError(f"softmax_loss: impl must be one of {sorted(_SOFTMAX_IMPLS)}, got {impl!r}")
    mesh, axis = _mesh_for(impl, mesh, axis)
    _check_inputs(zimg, ztxt, mesh, axis)
    if mesh is None:
        return _softmax_dense(zimg, ztxt, log_t)
    local = functools.partial(_SOFTMAX_IMPLS[impl], axis=axis, **_tile_kw(impl, zimg, mesh, axis, tile))
    return _sharded(local, mesh, axis, 2, 1)(zimg, ztxt, log_t)


def global_index(b: int, axes: tuple[str, ...]) -> jax.Array:
    """Global row numbers of this device's b rows (the CLIP pairing labels)."""
    return jax.lax.axis_index(axes) * b + jnp.arange(b, dtype=jnp.int32)


def dot_sim(log_t, a, c):
    """t·a·cᵀ for both directions (the CLIP similarity)."""
    x = jnp.exp(log_t.astype(jnp.float32)) * _dot_t(a, c)
    return x, x


def _softmax_blockwise_local(zi, zt, log_t, *, axis, tile):
    axes = _axis_tuple(axis)
    n, b = jax.lax.axis_size(axes), zi.shape[0]
    g = global_index(b, axes)
    obj = infonce.Objective(dot_sim, both=True, exclude=False, denom=2 * b * n)
    return infonce.ring_loss(log_t, zi, g, g, zt, g, g, obj, axes, n, blockwise.check_tile(b, tile))


_SOFTMAX_IMPLS: dict[str, Callable] = {
    "all_gather": _softmax_all_gather_local,
    "ring": functools.partial(_softmax_blockwise_local, tile=None),
    "tiled": _softmax_blockwise_local,
}


# --------------------------------------------------------------------------- sigmoid


def _sigmoid_block_sum(zi, zt, t, bias, diag_offset):
    """Σ_ij −log σ(ℓ_ij (t·z^I_i·z^T_j + b)) over one block; positives on the
    diagonal shifted by ``diag_offset`` columns (or none if out of range)."""
    logits = t * _dot_t(zi, zt) + bias
    rows = jnp.arange(zi.shape[0])[:, None]
    cols = jnp.arange(zt.shape[0])[None, :]
    sign = jnp.where(cols == rows + diag_offset, 1.0, -1.0)
    return jnp.sum(jax.nn.softplus(-sign * logits))


def _sigmoid_dense(zimg, ztxt, log_t, bias):
    t = jnp.exp(log_t.astype(jnp.float32))
    return _sigmoid_block_sum(zimg, ztxt, t, bias.astype(jnp.float32), 0) / zimg.shape[0]


def _sigmoid_all_gather_local(zi, zt, log_t, bias, *, axis):
    axes = _axis_tuple(axis)
    t = jnp.exp(log_t.astype(jnp.float32))
    b = zi.shape[0]
    zt_all = jax.lax.all_gather(zt, axes, axis=0, tiled=True)
    local = _sigmoid_block_sum(zi, zt_all, t, bias.astype(jnp.float32), jax.lax.axis_index(axes) * b)
    return jax.lax.psum(local, axes) / zt_all.shape[0]


def sigmoid_loss(
    zimg: jax.Array,
    ztxt: jax.Array,
    log_t: jax.Array,
    bias: jax.Array,
    *,
    impl: str = "all_gather",
    mesh: Mesh | None = None,
    axis: Axis = "data",
    tile: int | None = None,
) -> jax.Array:
    r"""SigLIP pairwise sigmoid loss over the global batch.

    L = −(1/B) Σ_{i=1..B} Σ_{j=1..B} log σ(ℓ_ij (t·z^I_i·z^T_j + b)),
    ℓ_ii = +1, ℓ_ij = −1 for i ≠ j.

    impl="all_gather": each device gathers the texts (B×d) and scores its b
    images against all of them.
      memory per device: B·d gathered texts + b·B float32 logits kept for the
      backward pass;
      communication per device: all_gather of one modality, (N−1)·b·d elements
      forward, the same as reduce-scatter backward;
      FLOPs: 2·b·B·d forward, ≈ 4·b·B·d backward (≈ 6·B²·d over all devices).
    impl="ring": the texts travel the ring of N devices (ppermute); a custom
    VJP keeps no logits for the backward (only the inputs) and recomputes each
    block, the chunk's gradient accumulator travelling the ring with it.
      memory per device: O(b·d) + one b×b block in flight, independent of N;
      communication per device: (N−1)·b·d forward, 2·(N−1)·b·d + b·d backward;
      FLOPs: ≈ 8·B²·d in all (2 forward, 6 backward).
    impl="tiled": as "ring" with tile×tile pieces: O(b·d + tile²) memory.
    With ``mesh=None``: the dense formula, one B×B logit matrix ("ring" and
    "tiled" then run on a one-device mesh).
    """
    if impl not in _SIGMOID_IMPLS:
        raise ValueError(f"sigmoid_loss: impl must be one of {sorted(_SIGMOID_IMPLS)}, got {impl!r}")
    mesh, axis = _mesh_for(impl, mesh, axis)
    _check_inputs(zimg, ztxt, mesh, axis)
    if mesh is None:
        return _sigmoid_dense(zimg, ztxt, log_t, bias)
    local = functools.partial(_SIGMOID_IMPLS[impl], axis=axis, **_tile_kw(impl, zimg, mesh, axis, tile))
    return _sharded(local, mesh, axis, 2, 2)(zimg, ztxt, log_t, bias)


def _sigmoid_blockwise_local(zi, zt, log_t, bias, *, axis, tile):
    axes = _axis_tuple(axis)
    n = jax.lax.axis_size(axes)
    return blockwise.sigmoid_ring_local(zi, zt, log_t, bias, axes, n, blockwise.check_tile(zi.shape[0], tile))


_SIGMOID_IMPLS: dict[str, Callable] = {
    "all_gather": _sigmoid_all_gather_local,
    "ring": functools.partial(_sigmoid_blockwise_local, tile=None),
    "tiled": _sigmoid_blockwise_local,
}

SOFTMAX_IMPLS = tuple(_SOFTMAX_IMPLS)
SIGMOID_IMPLS = tuple(_SIGMOID_IMPLS)
