"""Regex rules over parameter paths ("image/encoder/block0/attn/query/kernel"):
freezing, learning-rate multipliers and partial initialisation from another
run's checkpoint. The same path strings drive the sharding rules in
``parallel``.
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

import jax
import numpy as np
from flax import traverse_util

from vlm_jax.parallel import path_str

Params = dict[str, Any]


def _flat(params: Params) -> dict[str, Any]:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}


def _unflat(flat: dict[str, Any]) -> Params:
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def matches(path: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, path) for p in patterns)


def check_patterns(params: Params, patterns: Sequence[str], field: str) -> None:
    """Every rule must select at least one parameter: a rule that matches
    nothing is almost always a typo, and silently training everything is worse."""
    names = list(_flat(params))
    for p in patterns:
        try:
            rx = re.compile(p)
        except re.error as e:
            raise ValueError(f"{field}: {p!r} is not a valid regular expression ({e})") from None
        if not any(rx.search(n) for n in names):
            raise ValueError(f"{field}: rule {p!r} matches no parameter (e.g. {names[:3]})")


def split(params: Params, frozen: Sequence[str]) -> tuple[Params, Params]:
    """(trainable, frozen) sub-trees; either may be empty."""
    flat = _flat(params)
    train = {k: v for k, v in flat.items() if not matches(k, frozen)}
    fixed = {k: v for k, v in flat.items() if matches(k, frozen)}
    return _unflat(train), _unflat(fixed)


def merge(a: Params, b: Params) -> Params:
    return _unflat({**_flat(a), **_flat(b)})


def lr_labels(params: Params, lr_rules: Sequence[tuple[str, float]]) -> Params:
    """A label per parameter: the index of the first matching rule, or "base"."""
    def label(path, _):
        name = path_str(path)
        for i, (pattern, _mult) in enumerate(lr_rules):
            if re.search(pattern, name):
                return f"rule{i}"
        return "base"

    return jax.tree_util.tree_map_with_path(label, params)


# --------------------------------------------------------------------------- partial initialisation


def load_params(workdir: str, step: int | None = None) -> tuple[dict[str, np.ndarray], int]:
    """The parameters of another run's checkpoint as host arrays, keyed by path."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if not os.path.isdir(directory):
        raise ValueError(f"config.model_init.workdir: no checkpoints in {workdir!r}")
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True)) as mgr:
        step = mgr.latest_step() if step is None or step < 0 else step
        if step is None or step not in mgr.all_steps():
            raise ValueError(f"config.model_init.step: {workdir!r} has no checkpoint {step} (has {mgr.all_steps()})")
        meta = mgr.item_metadata(step)["state"]
        restore_args = _numpy_restore_args(meta)
        state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(restore_args=restore_args)))["state"]
    return _flat(state["params"]), step


def _numpy_restore_args(meta):
    import orbax.checkpoint as ocp

    tree = meta.tree if hasattr(meta, "tree") else meta
    return jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)


def init_from(params: Params, source: dict[str, np.ndarray], rules: Sequence[tuple[str, str]], where: str) -> tuple[Params, list[str]]:
    """Replaces every parameter whose path matches a rule's regex by the source
    array at ``re.sub(regex, replacement, path)``; returns (params, loaded paths).

    Missing or mis-shaped source arrays are errors naming both paths."""
    flat = _flat(params)
    loaded = []
    for pattern, replacement in rules:
        hit = False
        for name in flat:
            if not re.search(pattern, name):
                continue
            hit = True
            src = re.sub(pattern, replacement, name)
            if src not in source:
                raise ValueError(f"config.model_init: {name} maps to {src}, which the checkpoint in {where} does not hold")
            want, got = tuple(flat[name].shape), tuple(source[src].shape)
            if want != got:
                raise ValueError(f"config.model_init: {name} has shape {want} but {src} in {where} has shape {got}")
            flat[name] = np.asarray(source[src], dtype=flat[name].dtype)
            loaded.append(name)
        if not hit:
            raise ValueError(f"config.model_init.rules: {pattern!r} matches no parameter of this model")
    return _unflat(flat), loaded
