"""The train loop: one file, read top to bottom.

    python -m vlm_jax.train --config configs/default.py[:arg] --workdir DIR [--config.a.b=value ...]

1 session (config, mesh, data, model, objective, optimiser, sharded state:
``vlm_jax.session``) · 2 the jitted train step (``vlm_jax.step``) · 3 resume ·
4 the loop: log, evaluate (``vlm_jax.evaluators``), checkpoint.
The host never waits for the device between log steps: each step's outputs
stay on the device until a log, evaluation or checkpoint step reads them, and
then the finiteness flags of every step since the last read are checked, so a
non-finite step is still named exactly and no checkpoint after it is written.
Restarting the same command after a crash or a kill resumes from the last
checkpoint and reproduces the uninterrupted run's metrics.
"""

from __future__ import annotations

if __name__ == "__main__":  # glibc reads its tunables at start-up: re-execute before anything heavy is imported
    from vlm_jax import hostmem

    hostmem.reexec_with_huge_pages()

import json
import os
import signal
import sys
import threading
import time
from typing import Sequence

import jax

from vlm_jax import checkpoint, config as config_lib, evaluators, metrics as metrics_lib, parallel, session
from vlm_jax import step as step_lib
from vlm_jax import workdir as workdir_lib
from vlm_jax.data import pipeline
from vlm_jax.errors import ConfigError, cli_errors, first_line


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after saving; run the same command again


class Stopped(Exception):
    """Training stopped early on purpose (a signal); the checkpoint is saved."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class FiniteGuard:
    """Reads the finiteness flags of the steps since the last read (one host
    read for all) and decides: with ``train.nonfinite="stop"`` the first bad
    step stops the run; with "skip" the step's update was not applied (the
    train step kept the old state) and the run stops only after more than
    ``train.max_skipped`` bad steps in a row."""

    def __init__(self, mode: str, max_skipped: int):
        self.mode, self.max_skipped, self.in_a_row = mode, max_skipped, 0

    def check(self, pending: list[tuple[int, jax.Array]]) -> str | None:
        """None if training may go on, else the reason it must stop."""
        flags = jax.device_get([flag for _, flag in pending])
        for (step, _), ok in zip(pending, flags):
            if ok:
                self.in_a_row = 0
                continue
            if self.mode == "stop":
                return f"non-finite loss, gradients or parameters at step {step}"
            self.in_a_row += 1
            if self.in_a_row > self.max_skipped:
                return (f"non-finite loss, gradients or parameters at step {step}, {self.in_a_row} such steps in a "
                        f"row (more than config.train.max_skipped={self.max_skipped})")
        return None


class Signals:
    """SIGTERM (schedulers, preemption) and SIGINT (Ctrl-C): the first asks
    the loop to finish its step, save and exit; a second exits at once."""

    def __init__(self):
        self.received: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            os._exit(128 + signum)
        self.received = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step and saving; send it again to exit at once",
              file=sys.stderr)

    def __enter__(self) -> "Signals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def stop_requested(self, step: int) -> bool:
        if jax.process_count() > 1:  # every process must save the same step: JAX's preemption sync point
            from jax.experimental import multihost_utils

            try:
                return multihost_utils.reached_preemption_sync_point(step) or self.received is not None
            except RuntimeError:  # no preemption service in this runtime: the signal of this process only
                pass
        return self.received is not None


def next_batch(data_iter, config, step: int) -> dict:
    """The next per-process batch; a record that cannot be read or decoded
    stops the run with the dataset named (nothing after the last checkpoint is lost)."""
    try:
        return next(data_iter)
    except Exception as e:  # grain, TFDS and PIL raise many types for a damaged record
        raise ConfigError(
            f"config.data: reading the batch of step {step} from {config.data.dataset!r} in "
            f"{config.data.data_dir!r} failed ({first_line(e)}). "
            f"The data files may be damaged: re-prepare the dataset (for the embedded one, delete its "
            f"directory and it is generated again)") from e


def _open_workdir(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"--workdir {workdir}: a file of that name is in the way; give a directory") from None
    except OSError as e:
        raise ConfigError(f"--workdir {workdir}: cannot create it ({e.strerror})") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir {workdir}: not writable; give a directory you can write to")


def train(config, workdir: str, allow_config_change: bool = False) -> dict[str, float]:
    """Trains (or resumes) and returns the last logged metrics."""
    # 1. session: everything that can be wrong fails here, before anything is written or compiled
    run = session.setup(config)
    suite = evaluators.Suite(config, run.mesh, run.objective.embedder(), run.ds)  # data loaded, nothing compiled yet
    _open_workdir(workdir)
    with workdir_lib.run_lock(workdir), Signals() as signals:
        return _train(config, workdir, run, suite, signals, allow_config_change)


def _train(config, workdir, run, suite, signals, allow_config_change) -> dict[str, float]:
    mesh, abstract, state_sh = run.mesh, run.abstract, run.state_sh
    lead = jax.process_index() == 0
    mgr = checkpoint.manager(workdir, config.train.keep_checkpoints)
    record = checkpoint.compat_record(config, abstract["params"])
    train_ds = pipeline.train_dataset(
        run.ds, config.data, config.model.text.max_len, config.train.batch_size, config.seed,
        jax.process_index(), jax.process_count(),
        fields=run.fields, augment=run.objective.augment,
    )
    data_iter = iter(train_ds)
    config_dict = config.to_dict()
    if config.data.index_file:  # its path is in the config; a resume must also read the same content
        config_dict[workdir_lib.INPUTS] = {"index_file_sha256": pipeline.file_digest(config.data.index_file)}

    # 3. resume from the newest intact checkpoint, or initialise (and load parts of another run: LiT)
    def compatible(saved_record, step):
        session.check_compatible(saved_record, record, workdir)

    restored = checkpoint.restore_latest(mgr, workdir, session.with_shardings(abstract, state_sh), compatible)
    changes = {}
    if restored is None:
        state = jax.jit(run.init_state, out_shardings=state_sh)(jax.random.PRNGKey(config.seed))
        if config.model_init.workdir:
            state["params"] = session.initialise_from_checkpoint(config, state["params"], state_sh["params"])
        start = 0
    else:
        start, state, data_state = restored
        changes = workdir_lib.check_resume(workdir, config_dict, start, allow_config_change,
                                           config_lib.base_config().to_dict())
        data_iter.set_state(data_state)
        print(f"resumed from {workdir} at step {start}", file=sys.stderr)
        for key, (old, new) in changes.items():
            print(f"config change from step {start}: {key} {old!r} -> {new!r}", file=sys.stderr)
    if lead:  # only now: a refused workdir keeps the config (and history) of its own run
        workdir_lib.record_config(workdir, config_dict, start, changes)

    # 2. the step (compiled once; the evaluators compile theirs at their first run)
    train_step = step_lib.make_train_step(config, run.objective, run.tx, run.schedule, mesh, state_sh)
    batch_sh = parallel.batch_sharding(mesh)
    writer = metrics_lib.MetricsWriter(workdir, start, enabled=lead)
    progress = metrics_lib.Progress(start, config.train.steps, enabled=lead and config.train.progress)
    guard = FiniteGuard(config.train.nonfinite, config.train.max_skipped)
    total = config.train.steps
    last: dict[str, float] = {}
    pending: list[tuple[int, jax.Array]] = []  # (step, finiteness flag) not yet read back
    t_last, steps_since = time.time(), 0

    # 4. the loop (whatever ends it, an in-flight checkpoint is completed)
    try:
        for step in range(start + 1, total + 1):
            local = next_batch(data_iter, config, step)
            batch = {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in local.items()}
            state, out = train_step(state, batch)  # dispatched; nothing below waits for it until a read
            pending.append((step, out.pop(step_lib.FINITE)))
            steps_since += 1
            progress.update(step)

            stop = signals.stop_requested(step)
            log_now = step % config.train.log_every == 0 or step == total
            eval_now = suite.due(step, total)
            save_now = step % config.train.checkpoint_every == 0 or step == total or stop
            if not (log_now or eval_now or save_now):
                continue
            reason = guard.check(pending)
            if reason is not None:
                checkpoint.finish(mgr)
                raise FloatingPointError(f"{reason}; stopped without saving. "
                                         f"The last good checkpoint (step {mgr.latest_step()}) is kept in {workdir}.")
            pending.clear()
            row: dict[str, float] = {}
            if log_now:
                host = jax.device_get(out)
                now = time.time()
                row.update({k: float(v) for k, v in host.items()})
                row["train/examples_per_sec"] = steps_since * config.train.batch_size / max(now - t_last, 1e-9)
                t_last, steps_since = now, 0
            if eval_now:
                row.update(suite.run(state["params"], step, total))
            if row:
                writer.write(step, row)
                last = {"step": step, **row}
                progress.update(step, f"loss {row['train/loss']:.4f}" if "train/loss" in row else "", force=True)
            if save_now:
                checkpoint.save(mgr, step, state, data_iter.get_state(), record)
            if stop:  # the checkpoint completes in the ``finally`` below, before the message is printed
                progress.close()
                writer.close()
                name = signal.Signals(signals.received).name if signals.received else "preemption"
                raise Stopped(f"stopped by {name} at step {step}: checkpoint {step} saved in {workdir}; "
                              f"run the same command to resume", EXIT_PREEMPTED)
            if eval_now or save_now:
                t_last = time.time()  # evaluation and checkpoints are not training throughput
    finally:
        checkpoint.finish(mgr)

    progress.close()
    writer.close()
    mgr.close()
    return last


def _flags(parser) -> None:
    parser.add_argument("--allow_config_change", action="store_true",
                        help="resume a workdir with a config that changes the computation (kept in config_history.jsonl)")


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = session.parse_args(argv, prog="python -m vlm_jax.train", description=__doc__.split("\n\n")[0],
                              extra=_flags)
    session.initialize_distributed(args)
    config = session.load_config_or_exit(args)
    try:
        with cli_errors():
            last = train(config, args.workdir, args.allow_config_change)
    except FloatingPointError as e:
        raise SystemExit(f"error: {e}") from None
    except checkpoint.WriteFailed as e:
        raise SystemExit(
            f"error: writing a checkpoint to --workdir {args.workdir} failed ({e}); the checkpoints already "
            f"complete are intact: free space or fix permissions, then run the same command to resume") from None
    except OSError as e:  # disk full, permissions changed under the run, ...
        raise SystemExit(
            f"error: writing to --workdir {args.workdir} failed ({e.strerror or e}: {e.filename or ''}); the "
            f"checkpoints already complete are intact: free space or fix permissions, then run the same command "
            f"to resume") from None
    except Stopped as e:
        print(str(e), file=sys.stderr)
        raise SystemExit(e.code) from None
    if jax.process_index() == 0 and last:
        print(json.dumps(last, indent=1))
    return last


if __name__ == "__main__":
    main(sys.argv[1:])
