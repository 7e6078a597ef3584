"""The primitives every loss engine is built from: float32-accumulating
matmuls, the ring of devices (``shift``, ``varying``), tiling of a device's
rows, and the bookkeeping of a loss axis (its names, device count, automatic
tile, global row numbers).

Nothing here knows a loss; ``infonce``, ``sigmoid`` and the front end ``api``
import from this module, which imports no other module of the package.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

Axis = str | Sequence[str]

DEFAULT_MAX_TILE = 512


def dot_t(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b.T with float32 accumulation whatever the input dtype."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b with float32 accumulation whatever the input dtype."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def varying(x, axes):
    """Marks a constant as device-varying so it can be a loop carry next to
    per-device values under shard_map's type checking."""
    return jax.lax.pcast(x, tuple(axes), to="varying")


def shift(x, axes, n):
    """Sends x to the next device of the ring: device p receives from p − 1."""
    return jax.lax.ppermute(x, tuple(axes), perm=[(i, (i + 1) % n) for i in range(n)])


def tiles(x, tile):
    """Splits the leading axis of x (b rows) into b/tile pieces of tile rows."""
    b = x.shape[0]
    return x.reshape(b // tile, tile, *x.shape[1:])


def check_tile(b: int, tile: int | None) -> int:
    """The tile for b rows: b itself for None (one piece), else a divisor of b."""
    if tile is None:
        return b
    if tile <= 0 or b % tile:
        raise ValueError(f"tile={tile} must be a positive divisor of the per-device batch b={b}")
    return tile


def axis_tuple(axis: Axis) -> tuple[str, ...]:
    """A loss axis (a mesh axis name or a sequence of names) as a tuple of names."""
    return (axis,) if isinstance(axis, str) else tuple(axis)


def axis_devices(mesh: Mesh, axis: Axis) -> int:
    """Number of devices along ``axis`` (a name or a tuple of names)."""
    return int(np.prod([mesh.shape[a] for a in axis_tuple(axis)]))


def auto_tile(rows: int) -> int:
    """The largest divisor of ``rows`` up to DEFAULT_MAX_TILE."""
    return max(t for t in range(1, min(rows, DEFAULT_MAX_TILE) + 1) if rows % t == 0)


def global_index(b: int, axes: tuple[str, ...]) -> jax.Array:
    """Global row numbers of this device's b rows (the CLIP pairing labels)."""
    return jax.lax.axis_index(axes) * b + jnp.arange(b, dtype=jnp.int32)
