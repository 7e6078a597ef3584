"""Device mesh and sharding rules.

The mesh comes from ``config.mesh``: axes ``data`` and ``fsdp``. The batch is
sharded over both (every device sees different examples) and the losses'
``shard_map`` runs over both. Parameters and optimizer state are placed by
rules: explicit (regex over the "/"-joined path, PartitionSpec) pairs first,
then, when ``fsdp`` > 1, every array of at least ``fsdp_min_size`` elements is
split over ``fsdp`` along its largest divisible dimension (ZeRO-3 / FSDP: XLA
gathers a layer's weights where they are used and reduce-scatters their
gradients); everything else is replicated.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    fsdp = mesh_cfg.fsdp
    if fsdp <= 0 or len(devices) % fsdp:
        raise ValueError(f"config.mesh.fsdp={fsdp} does not divide the {len(devices)} devices")
    data = len(devices) // fsdp if mesh_cfg.data == -1 else mesh_cfg.data
    if data <= 0 or data * fsdp > len(devices):
        raise ValueError(f"config.mesh.data={mesh_cfg.data} × config.mesh.fsdp={fsdp} needs more than the "
                         f"{len(devices)} devices")
    grid = np.asarray(devices[: data * fsdp]).reshape(data, fsdp)
    # Auto axis types: flax linen (nn.Embed) does not support Explicit meshes.
    return Mesh(grid, DATA_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def num_data_devices(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in DATA_AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def path_str(path: tuple) -> str:
    """'img/encoder/block0/attn/query/kernel' for a pytree key path."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def tree_paths(tree: Any) -> Any:
    """The same tree with every leaf replaced by its path string."""
    return jax.tree_util.tree_map_with_path(lambda p, _: path_str(p), tree)


def fsdp_spec(shape: Sequence[int], fsdp: int, min_size: int) -> P:
    """Split the largest dimension divisible by ``fsdp`` if the array is big enough."""
    if fsdp <= 1 or int(np.prod(shape)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda i: -shape[i]):
        if shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def shardings_from_rules(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = (), fsdp_min_size: int = 1 << 14) -> Any:
    compiled = [(re.compile(pattern), P(*spec)) for pattern, spec in rules]
    fsdp = mesh.shape.get("fsdp", 1)

    def one(path, leaf):
        name = path_str(path)
        for pattern, spec in compiled:
            if pattern.search(name):
                if len(spec) > np.ndim(leaf):
                    raise ValueError(f"config.mesh.rules: {pattern.pattern!r} gives {spec} to {name} of rank {np.ndim(leaf)}")
                return NamedSharding(mesh, spec)
        return NamedSharding(mesh, fsdp_spec(np.shape(leaf), fsdp, fsdp_min_size))

    return jax.tree_util.tree_map_with_path(one, tree)
