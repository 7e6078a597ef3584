"""Checkpoints with orbax: train state, input-pipeline state, a compatibility
record and an integrity record, verified on every restore.

A checkpoint directory appears only once it is complete (orbax writes to a
temporary path and renames), so a run killed at any moment resumes from its
last complete checkpoint. Every checkpoint also carries a fingerprint of each
state array (computed on the devices where the array lives, so no array is
gathered) and digests of its data-iterator and compatibility records; a
restore recomputes them. A step that cannot be read or does not match is
reported (which step, which array or file), moved aside to
WORKDIR/damaged_checkpoints/, and the previous step is tried: nothing is ever
restored silently from damaged bytes.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from vlm_jax import parallel
from vlm_jax.errors import first_line

DAMAGED_DIR = "damaged_checkpoints"


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """The writer's manager (the train loop, convert): it removes what an
    interrupted save of its own workdir left behind."""
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True),
    )


def reader(workdir: str) -> ocp.CheckpointManager:
    """A manager that only reads (evaluate, a run's parameters): it never
    deletes, so it can open the workdir of a run that is training and saving."""
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                 options=ocp.CheckpointManagerOptions(read_only=True))


def flatten_config(d: Any, prefix: str = "config") -> dict[str, Any]:
    """{"config.a.b": value} of a nested config dict (tuples as lists)."""
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(flatten_config(v, f"{prefix}.{k}"))
        return out
    return {prefix: list(d) if isinstance(d, tuple) else d}


def compat_record(config, params: Any) -> dict:
    """What a checkpoint must agree on with the config that resumes from it."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    return {
        "params": sorted([parallel.path_str(p), list(x.shape), str(x.dtype)] for p, x in leaves),
        "config": {k: v for k, v in flatten_config(config.to_dict()).items()
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


# --------------------------------------------------------------------------- integrity


def _fingerprint(x: jax.Array) -> jax.Array:
    """Σ_k bits(x_k) · (2·c·k + 1) mod 2³², k the flat index: every multiplier
    is odd, so any single flipped bit changes the sum. Computed without a
    reshape, so a sharded array is reduced where it lives."""
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])
        bits = bits.astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= x.shape[axis]
    return jnp.sum(bits * (index * jnp.uint32(2 * 2654435761 % 2**32) + jnp.uint32(1)), dtype=jnp.uint32)


_fingerprints = jax.jit(lambda tree: jax.tree_util.tree_map(_fingerprint, tree))


def fingerprints(state: Any) -> dict[str, int]:
    """{array path: fingerprint} of every array of the state (one small host read)."""
    host = jax.device_get(_fingerprints(state))
    return {parallel.path_str(p): int(v) for p, v in jax.tree_util.tree_leaves_with_path(host)}


def _digest(record: Any) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


class DamagedCheckpoint(Exception):
    """A checkpoint step that cannot be read, or whose contents do not match its integrity record."""


# --------------------------------------------------------------------------- save and restore


class WriteFailed(Exception):
    """A checkpoint could not be written (a full disk, permissions, its
    directory removed under the save); the steps already complete are intact."""


def save(mgr: ocp.CheckpointManager, step: int, state: Any, data_state: dict, record: dict) -> None:
    """Starts writing checkpoint ``step`` (asynchronously: ``finish`` waits).
    WriteFailed if it, or the save still in flight before it, fails."""
    integrity = {"arrays": fingerprints(state), "data": _digest(data_state), "compat": _digest(record)}
    try:
        mgr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                compat=ocp.args.JsonSave(record),
                integrity=ocp.args.JsonSave(integrity),
            ),
        )
    except Exception as e:  # orbax reports a failed write under many types (its own, OSError, ValueError)
        raise WriteFailed(f"checkpoint step {step}: {first_line(e)}") from e


def finish(mgr: ocp.CheckpointManager) -> None:
    """Waits for the save in flight; WriteFailed if it failed."""
    try:
        mgr.wait_until_finished()
    except Exception as e:  # the asynchronous write's own error, re-raised here by orbax
        raise WriteFailed(f"the checkpoint in flight: {first_line(e)}") from e


def read_records(mgr: ocp.CheckpointManager, step: int) -> tuple[dict, dict]:
    """(compat record, integrity record) of a step; DamagedCheckpoint if unreadable."""
    try:
        out = mgr.restore(step, args=ocp.args.Composite(compat=ocp.args.JsonRestore(),
                                                          integrity=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for missing or damaged files: all mean "unreadable"
        raise DamagedCheckpoint(f"its records cannot be read ({first_line(e)})") from e
    if not isinstance(out["compat"], dict) or not isinstance(out["integrity"], dict):
        raise DamagedCheckpoint("its compatibility or integrity record is missing")
    if _digest(out["compat"]) != out["integrity"].get("compat"):
        raise DamagedCheckpoint("its compatibility record does not match its digest")
    return out["compat"], out["integrity"]


def read_compat(mgr: ocp.CheckpointManager, step: int) -> dict:
    return read_records(mgr, step)[0]


def restore(mgr: ocp.CheckpointManager, step: int, abstract_state: Any,
            integrity: dict | None = None) -> tuple[Any, dict]:
    """Restores and verifies (state, data_state) of ``step``; ``abstract_state``
    carries shapes and shardings (another device count than the writer's is
    fine); ``integrity``: the step's record if already read. Raises
    DamagedCheckpoint naming what does not match."""
    if integrity is None:
        _, integrity = read_records(mgr, step)
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if hasattr(x, "sharding") else x,
        abstract_state,
    )
    try:
        out = mgr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
        )
    except Exception as e:  # a truncated or missing array file, a damaged manifest, ...
        raise DamagedCheckpoint(f"its state cannot be read ({first_line(e)})") from e
    if not isinstance(out["data"], dict) or _digest(out["data"]) != integrity.get("data"):
        raise DamagedCheckpoint("its data-iterator record is missing or does not match its digest")
    saved, now = integrity.get("arrays", {}), fingerprints(out["state"])
    bad = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if bad:
        raise DamagedCheckpoint(f"{len(bad)} array(s) differ from their fingerprints: {', '.join(bad[:5])}")
    return out["state"], out["data"]


def move_aside(mgr: ocp.CheckpointManager, workdir: str, step: int) -> str:
    """Moves a damaged step out of the checkpoint directory (never deletes it)."""
    src = os.path.join(os.path.abspath(os.path.join(workdir, "checkpoints")), str(step))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    dst = os.path.join(os.path.abspath(workdir), DAMAGED_DIR, f"{step}-{stamp}")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.move(src, dst)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"vlm_jax moved aside checkpoint {step}")
    mgr.reload()
    return dst


def restore_latest(mgr: ocp.CheckpointManager, workdir: str, abstract_state: Any,
                   check: Callable[[dict, int], None]) -> tuple[int, Any, dict] | None:
    """(step, state, data_state) of the newest intact checkpoint, or None.

    ``check(compat_record, step)`` refuses an incompatible config (its error
    propagates: that is the user's config, not damage). Each damaged step is
    reported on stderr, moved aside, and the one before it is tried."""
    for step in sorted(mgr.all_steps(), reverse=True):
        try:
            compat, integrity = read_records(mgr, step)
            check(compat, step)
            state, data = restore(mgr, step, abstract_state, integrity)
            return step, state, data
        except DamagedCheckpoint as e:
            dst = move_aside(mgr, workdir, step)
            print(f"warning: checkpoint step {step} in {workdir} is damaged: {e}. Moved it to {dst}; "
                  f"trying the step before it.", file=sys.stderr)
    return None

