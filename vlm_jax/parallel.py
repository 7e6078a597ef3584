"""Device mesh and sharding rules.

The mesh comes from ``config.mesh``; every data-parallel axis shards the batch
and is the axis the losses' ``shard_map`` runs over. Parameters are placed by
rules: (regex over the "/"-joined parameter path, PartitionSpec); the first
match wins and anything unmatched is replicated.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data",)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices) if mesh_cfg.data == -1 else mesh_cfg.data
    if n > len(devices) or len(devices) % n:
        raise ValueError(f"config.mesh.data={mesh_cfg.data}: cannot use {n} of the {len(devices)} devices")
    # Auto axis types: flax linen (nn.Embed) does not support Explicit meshes.
    return Mesh(np.asarray(devices[:n]), DATA_AXES, axis_types=(AxisType.Auto,))


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


def shardings_from_rules(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, P]] = ()) -> Any:
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

    def one(path, leaf):
        name = path_str(path)
        for pattern, spec in compiled:
            if pattern.search(name):
                if len(spec) > np.ndim(leaf):
                    raise ValueError(f"sharding rule {pattern.pattern!r} gives {spec} to {name} of rank {np.ndim(leaf)}")
                return NamedSharding(mesh, spec)
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, tree)
