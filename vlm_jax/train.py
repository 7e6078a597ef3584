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

import json
import os
import sys
import time
from typing import Sequence

import jax

from vlm_jax import checkpoint, evaluators, metrics as metrics_lib, parallel, session, step as step_lib
from vlm_jax.data import pipeline
from vlm_jax.errors import ConfigError


def first_bad_step(pending: list[tuple[int, jax.Array]]) -> int | None:
    """The first step whose finiteness flag is false (one host read for all)."""
    flags = jax.device_get([flag for _, flag in pending])
    for (step, _), ok in zip(pending, flags):
        if not ok:
            return step
    return None


def train(config, workdir: str) -> dict[str, float]:
    """Trains (or resumes) and returns the last logged metrics."""
    # 1. session: everything that can be wrong fails here, before anything is written or compiled
    run = session.setup(config)
    mesh, abstract, state_sh = run.mesh, run.abstract, run.state_sh
    suite = evaluators.Suite(config, mesh, run.objective.embedder(), run.ds)  # data loaded, nothing compiled yet
    os.makedirs(workdir, exist_ok=True)
    lead = jax.process_index() == 0
    mgr = checkpoint.manager(workdir, config.train.keep_checkpoints)
    record = checkpoint.compat_record(config, abstract["params"])
    train_ds = pipeline.train_dataset(
        run.ds, config.data, config.model.text.max_len, config.train.batch_size, config.seed,
        jax.process_index(), jax.process_count(),
        fields=run.objective.example_fields, augment=run.objective.augment,
    )
    data_iter = iter(train_ds)

    # 3. resume, or initialise (and load parts of another run: LiT)
    start = mgr.latest_step()
    if start is None:
        state = jax.jit(run.init_state, out_shardings=state_sh)(jax.random.PRNGKey(config.seed))
        if config.model_init.workdir:
            state["params"] = session.initialise_from_checkpoint(config, state["params"], state_sh["params"])
        start = 0
    else:
        session.check_workdir(mgr, start, config, abstract, workdir)
        state, data_state = checkpoint.restore(mgr, start, session.with_shardings(abstract, state_sh))
        data_iter.set_state(data_state)
        print(f"resumed from {workdir} at step {start}", file=sys.stderr)
    if lead:  # only now: a refused workdir keeps the config.json of its own run
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=1, default=list)

    # 2. the step (compiled once; the evaluators compile theirs at their first run)
    train_step = step_lib.make_train_step(config, run.objective, run.tx, run.schedule, mesh, state_sh)
    batch_sh = parallel.batch_sharding(mesh)
    writer = metrics_lib.MetricsWriter(workdir, start, enabled=lead)
    progress = metrics_lib.Progress(start, config.train.steps, enabled=lead and config.train.progress)
    total = config.train.steps
    last: dict[str, float] = {}
    pending: list[tuple[int, jax.Array]] = []  # (step, finiteness flag) not yet read back
    t_last, steps_since = time.time(), 0

    # 4. the loop
    for step in range(start + 1, total + 1):
        local = next(data_iter)
        batch = {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in local.items()}
        state, out = train_step(state, batch)  # dispatched; nothing below waits for it until a read
        pending.append((step, out.pop(step_lib.FINITE)))
        steps_since += 1
        progress.update(step)

        log_now = step % config.train.log_every == 0 or step == total
        eval_now = suite.due(step, total)
        save_now = step % config.train.checkpoint_every == 0 or step == total
        if not (log_now or eval_now or save_now):
            continue
        bad = first_bad_step(pending)
        if bad is not None:
            mgr.wait_until_finished()
            raise FloatingPointError(
                f"non-finite loss, gradients or parameters at step {bad}; stopped without saving. "
                f"The last good checkpoint (step {mgr.latest_step()}) is kept in {workdir}."
            )
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
        if eval_now or save_now:
            t_last = time.time()  # evaluation and checkpoints are not training throughput

    mgr.wait_until_finished()
    progress.close()
    writer.close()
    mgr.close()
    return last


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = session.parse_args(argv, prog="python -m vlm_jax.train", description=__doc__.split("\n\n")[0])
    session.initialize_distributed(args)
    config = session.load_config_or_exit(args)
    try:
        last = train(config, args.workdir)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if jax.process_index() == 0 and last:
        print(json.dumps(last, indent=1))
    return last


if __name__ == "__main__":
    main(sys.argv[1:])
