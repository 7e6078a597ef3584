"""A workdir has one writer, and its config history is explicit.

``Lock`` (``run_lock`` for a run of several processes, where process 0
holds it): an exclusive ``flock`` on WORKDIR/.lock, holding the writer's host,
pid and start time. The kernel drops the lock when the process dies, however
it dies (``kill -9`` included), so a crashed run never leaves a stale lock
behind; a second trainer on the same workdir is refused at once with the
holder named. Readers (``python -m vlm_jax.evaluate``) take no lock.

``check_resume``: the fields of the config that change the computation
(seed, batch, optimiser, data, loss, ...) must equal those of the run being
resumed, unless the change is allowed explicitly; then every config that took
effect is kept in WORKDIR/config_history.jsonl with the step it started at.
Fields that only change bookkeeping (log/eval/checkpoint frequency, the
evaluations, ``train.steps``, the input threads) may change freely. The
record's ``inputs`` section (``INPUTS``) holds digests of files the config
names only by path (a curated index): their content is checked as a field.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from typing import Any

import numpy as np

from vlm_jax.checkpoint import flatten_config
from vlm_jax.errors import ConfigError

INPUTS = "inputs"  # the recorded config's section of input-file digests, beside the config's own fields
LOCK_NAME = ".lock"
HISTORY_NAME = "config_history.jsonl"

# Config fields (dotted prefixes) a resumed run may change without --allow_config_change.
FREE_TO_CHANGE = (
    "config.train.steps", "config.train.log_every", "config.train.checkpoint_every", "config.train.keep_checkpoints",
    "config.train.eval_every", "config.train.progress", "config.evals.", "config.data.num_threads",
    "config.data.prefetch", "config.data.workers", "config.data.cache_mib", "config.mesh.",  # a resumed run may use another device count (elastic resume)
)


class Lock:
    """Context manager: the exclusive writer's lock of ``workdir``."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_NAME)
        self._fd: int | None = None

    def __enter__(self) -> "Lock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"--workdir: cannot create {self.path} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(
                f"--workdir {os.path.dirname(self.path)} is in use by {holder}; wait for it to finish, stop it, "
                f"or use another --workdir") from None
        info = f"pid {os.getpid()} on host {socket.gethostname()} since {datetime.datetime.now().isoformat(timespec='seconds')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def run_lock(workdir: str):
    """The writer's lock for a run of one or several processes: process 0
    takes it (the workdir is shared), and every process refuses together."""
    import jax

    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = Lock(workdir).__enter__()
        except ConfigError as e:
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not ok and error is None:
            error = ConfigError(f"--workdir {workdir} is in use (process 0 was refused the lock)")
    if error is not None:
        raise error
    try:
        yield
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def read_history(workdir: str) -> list[dict]:
    path = os.path.join(workdir, HISTORY_NAME)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def changed_fields(old: dict, new: dict, defaults: dict | None = None) -> dict[str, tuple[Any, Any]]:
    """{field: (old, new)} of the computation-changing fields that differ.

    A field the old config lacks (added to the library after that run
    started) is no change while the new config keeps it at its default in
    ``defaults``: a new field's default is the behaviour from before it.
    Likewise an input digest (``INPUTS``) the old record lacks: that run
    started before digests were recorded, and its content cannot be
    compared."""
    a, b = flatten_config(old), flatten_config(new)
    d = flatten_config(json.loads(json.dumps(defaults, default=list))) if defaults else {}
    out = {}
    for key in sorted(set(a) | set(b)):
        if key.startswith(FREE_TO_CHANGE) or key in FREE_TO_CHANGE:
            continue
        if key not in a and key in b and key in d and b[key] == d[key]:
            continue
        if key not in a and key.startswith(f"config.{INPUTS}."):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out[key] = (a.get(key, "<absent>"), b.get(key, "<absent>"))
    return out


def check_resume(workdir: str, config: dict, step: int, allow_change: bool,
                 defaults: dict | None = None) -> dict[str, tuple[Any, Any]]:
    """Refuses (ConfigError) to resume at ``step`` with a computation-changing
    config change unless ``allow_change``; returns the changes. ``defaults``
    (the schema's defaults, ``base_config().to_dict()``) lets a field added
    since the run started pass at its default."""
    config = json.loads(json.dumps(config, default=list))  # tuples as JSON has them
    history = read_history(workdir)
    if not history:
        path = os.path.join(workdir, "config.json")
        if not os.path.exists(path):
            return {}
        with open(path) as f:  # a workdir written before the history existed
            history = [{"step": 0, "config": json.load(f)}]
    changes = changed_fields(history[-1]["config"], config, defaults)
    if changes and not allow_change:
        listed = "; ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in list(changes.items())[:5])
        raise ConfigError(
            f"--workdir {workdir} holds a run with another config ({listed}). Resume with its config, use another "
            f"--workdir, or pass --allow_config_change to continue from step {step} with the new one "
            f"(both are kept in {HISTORY_NAME})")
    return changes


def record_config(workdir: str, config: dict, step: int, changes: dict) -> None:
    """config.json = the config in force; config_history.jsonl gets a line
    whenever a run starts with another config than the last one."""
    config = json.loads(json.dumps(config, default=list))
    history = read_history(workdir)
    if not history or flatten_config(history[-1]["config"]) != flatten_config(config):
        entry = {"step": step, "config": config}
        if changes:
            entry["changes"] = {k: [a, b] for k, (a, b) in changes.items()}
        with open(os.path.join(workdir, HISTORY_NAME), "a") as f:
            f.write(json.dumps(entry, default=list) + "\n")
    tmp = os.path.join(workdir, "config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(config, f, indent=1, default=list)
    os.replace(tmp, os.path.join(workdir, "config.json"))
