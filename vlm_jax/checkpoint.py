"""Checkpoints with orbax: train state, input-pipeline state and a compatibility record.

A checkpoint directory appears only once it is complete (orbax writes to a
temporary path and renames), so a run killed at any moment resumes from its
last complete checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from vlm_jax import parallel


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True),
    )


def _flatten_config(d: Any, prefix: str = "config") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten_config(v, f"{prefix}.{k}"))
        return out
    return {prefix: list(d) if isinstance(d, tuple) else d}


def compat_record(config, params: Any) -> dict:
    """What a checkpoint must agree on with the config that resumes from it."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    return {
        "params": sorted([parallel.path_str(p), list(x.shape), str(x.dtype)] for p, x in leaves),
        "config": {k: v for k, v in _flatten_config(config.to_dict()).items()
                   if k.startswith(("config.model.", "config.loss.kind", "config.data.tokenizer", "config.data.vocab_size",
                                     "config.train.freeze", "config.optim.lr_rules"))},
    }


def check_compatible(saved: dict, current: dict, workdir: str) -> None:
    """Raises naming the first config field (or parameter) that differs."""
    problems = []
    # Fields only one side knows (added or removed by a newer version of this
    # library) are left to the parameter comparison below.
    for key in sorted(set(saved["config"]) & set(current["config"])):
        a, b = saved["config"][key], current["config"][key]
        if a != b:
            problems.append(f"{key} is {a!r} in the checkpoint but {b!r} now")
    if not problems and saved["params"] != current["params"]:
        old = {p[0]: p[1:] for p in saved["params"]}
        new = {p[0]: p[1:] for p in current["params"]}
        for name in sorted(set(old) | set(new)):
            if old.get(name) != new.get(name):
                problems.append(f"parameter {name} is {old.get(name)} in the checkpoint but {new.get(name)} now")
                break
    if problems:
        raise ValueError(
            f"--workdir {workdir} holds a checkpoint from an incompatible config: "
            + "; ".join(problems[:3])
            + ". Use another --workdir, or the config that wrote it."
        )


def save(mgr: ocp.CheckpointManager, step: int, state: Any, data_state: dict, record: dict) -> None:
    mgr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            compat=ocp.args.JsonSave(record),
        ),
    )


def read_compat(mgr: ocp.CheckpointManager, step: int) -> dict:
    return mgr.restore(step, args=ocp.args.Composite(compat=ocp.args.JsonRestore()))["compat"]


def restore(mgr: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores (state, data_state); ``abstract_state`` carries shapes and shardings."""
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if hasattr(x, "sharding") else x,
        abstract_state,
    )
    out = mgr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
    )
    return out["state"], out["data"]

