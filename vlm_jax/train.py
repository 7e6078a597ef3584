"""The train loop: one file, read top to bottom.

    python -m vlm_jax.train --config configs/default.py[:arg] --workdir DIR [--config.a.b=value ...]

Sections: 1 config · 2 mesh · 3 data · 4 model, optimizer and sharded state ·
5 loss and train step · 6 checkpoint / resume · 7 the loop (metrics, eval).
Restarting the same command after a crash or a kill resumes from the last
checkpoint and reproduces the uninterrupted run's metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from vlm_jax import checkpoint, config as config_lib, evaluate, losses, metrics as metrics_lib, optim, parallel
from vlm_jax.data import pipeline
from vlm_jax.models import towers

State = dict[str, Any]  # {"step", "params", "opt_state", "rng"}: a plain pytree


# --------------------------------------------------------------------------- 1. config


def parse_args(argv: Sequence[str] | None, prog: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="config file, optionally with ':arg' for get_config(arg)")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard events")
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for item in rest:
        if not item.startswith("--config."):
            parser.error(f"unrecognised argument {item!r} (overrides look like --config.train.steps=200)")
        overrides.append(item[len("--config."):])
    args.overrides = overrides
    return args


def load_config_or_exit(args: argparse.Namespace) -> config_lib.ConfigDict:
    try:
        return config_lib.load_config(args.config, args.overrides)
    except config_lib.ConfigError as e:
        raise SystemExit(f"error: {e}") from None


# --------------------------------------------------------------------------- 2-4. mesh, data, model, state


@dataclasses.dataclass
class Setup:
    mesh: Mesh
    ds: pipeline.Dataset
    model: towers.TwoTower
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    init_state: Callable[[jax.Array], State]
    abstract: State  # shapes and dtypes of the state
    state_sh: State  # its shardings


def setup(config) -> Setup:
    """Mesh, opened data, model, optimizer, abstract state and its shardings.

    Everything that can be wrong with the config or the data fails here, as a
    ConfigError naming the field, before anything is compiled.
    """
    try:
        mesh = parallel.make_mesh(config.mesh)
        config_lib.check_against_mesh(config, parallel.num_data_devices(mesh))
        ds = pipeline.open_dataset(config.data)
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, config_lib.ConfigError):
            raise
        raise config_lib.ConfigError(str(e)) from e
    model = towers.make_model(
        config.model, ds.tokenizer.vocab_size, config.loss.log_t_init,
        config.loss.bias_init if config.loss.kind == "sigmoid" else None,
        config.loss.ssl_dim if config.loss.kind == "slip" else 0,
    )
    tx, schedule = optim.make_optimizer(config.optim, config.train.steps)

    def init_state(rng: jax.Array) -> State:
        init_rng, train_rng = jax.random.split(rng)
        s = config.data.image_size
        images = jnp.zeros((1, s, s, 3), jnp.float32)
        tokens = jnp.zeros((1, config.model.text.max_len), jnp.int32)
        params = model.init(init_rng, images, tokens)["params"]
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params), "rng": train_rng}

    abstract = jax.eval_shape(init_state, jax.random.PRNGKey(config.seed))
    state_sh = parallel.shardings_from_rules(abstract, mesh)
    return Setup(mesh, ds, model, tx, schedule, init_state, abstract, state_sh)


def with_shardings(abstract: State, shardings: State) -> State:
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


# --------------------------------------------------------------------------- 5. loss and train step


def make_train_step(config, model: towers.TwoTower, tx: optax.GradientTransformation, schedule, mesh, state_sh):
    kind = config.loss.kind
    loss_kw = dict(impl=config.loss.impl, mesh=mesh, axis=parallel.DATA_AXES, tile=config.loss.tile or None)
    TT = towers.TwoTower

    def objective(params, batch) -> tuple[jax.Array, jax.Array, jax.Array, dict[str, jax.Array]]:
        """(loss, log_t, bias, extra metrics) of the configured objective."""
        v = {"params": params}
        images = pipeline.normalize_images(batch["image"])
        if kind == "filip":
            log_t, bias = model.apply(v, method=TT.scalars)
            img_tokens = model.apply(v, images, method=TT.encode_image_tokens)
            txt_tokens, txt_mask = model.apply(v, batch["text"], method=TT.encode_text_tokens)
            return losses.filip_loss(img_tokens, txt_tokens, txt_mask, log_t, **loss_kw), log_t, bias, {}
        zimg, ztxt, log_t, bias = model.apply(v, images, batch["text"])
        if kind == "softmax":
            return losses.softmax_loss(zimg, ztxt, log_t, **loss_kw), log_t, bias, {}
        if kind == "sigmoid":
            return losses.sigmoid_loss(zimg, ztxt, log_t, bias, **loss_kw), log_t, bias, {}
        if kind == "unicl":
            return losses.unicl_loss(zimg, ztxt, batch["label"], log_t, **loss_kw), log_t, bias, {}
        # slip: CLIP on the image and image–image InfoNCE between two augmented views
        clip = losses.softmax_loss(zimg, ztxt, log_t, **loss_kw)
        h1 = model.apply(v, pipeline.normalize_images(batch["view1"]), method=TT.encode_view)
        h2 = model.apply(v, pipeline.normalize_images(batch["view2"]), method=TT.encode_view)
        ssl = losses.image_infonce_loss(h1, h2, jnp.float32(config.loss.ssl_log_t), **loss_kw)
        return clip + config.loss.ssl_weight * ssl, log_t, bias, {"train/clip_loss": clip, "train/ssl_loss": ssl}

    def train_step(state: State, batch: dict[str, jax.Array]) -> tuple[State, dict[str, jax.Array]]:
        def loss_fn(params):
            loss, log_t, bias, extra = objective(params, batch)
            return loss, (log_t, bias, extra)

        (loss, (log_t, bias, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {
            "step": state["step"] + 1,
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
            "rng": state["rng"],
        }
        out = {
            "train/loss": loss,
            "train/log_temp": log_t,
            "train/learning_rate": schedule(state["step"]),
            "train/grad_norm": optax.tree.norm(grads),
            **extra,
        }
        if kind == "sigmoid":
            out["train/bias"] = bias
        return new_state, out

    return jax.jit(
        train_step,
        in_shardings=(state_sh, parallel.batch_sharding(mesh)),
        out_shardings=(state_sh, parallel.replicated(mesh)),
        donate_argnums=0,
    )


# --------------------------------------------------------------------------- 6. checkpoint / resume


def check_workdir(mgr, step: int, config, abstract: State, workdir: str) -> None:
    try:
        checkpoint.check_compatible(
            checkpoint.read_compat(mgr, step), checkpoint.compat_record(config, abstract["params"]), workdir
        )
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from e


# --------------------------------------------------------------------------- 7. the loop


def train(config, workdir: str) -> dict[str, float]:
    """Trains (or resumes) and returns the last logged metrics."""
    run = setup(config)
    mesh, ds, model, abstract, state_sh = run.mesh, run.ds, run.model, run.abstract, run.state_sh
    os.makedirs(workdir, exist_ok=True)
    lead = jax.process_index() == 0
    mgr = checkpoint.manager(workdir, config.train.keep_checkpoints)
    record = checkpoint.compat_record(config, abstract["params"])
    train_ds = pipeline.train_dataset(
        ds, config.data, config.model.text.max_len, config.train.batch_size, config.seed,
        jax.process_index(), jax.process_count(),
        with_label=config.loss.kind == "unicl", two_views=config.loss.kind == "slip",
    )
    data_iter = iter(train_ds)
    start = mgr.latest_step()
    if start is None:
        state = jax.jit(run.init_state, out_shardings=state_sh)(jax.random.PRNGKey(config.seed))
        start = 0
    else:
        check_workdir(mgr, start, config, abstract, workdir)
        state, data_state = checkpoint.restore(mgr, start, with_shardings(abstract, state_sh))
        data_iter.set_state(data_state)
        print(f"resumed from {workdir} at step {start}", file=sys.stderr)
    if lead:  # only now: a refused workdir keeps the config.json of its own run
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=1, default=list)

    train_step = make_train_step(config, model, run.tx, run.schedule, mesh, state_sh)
    eval_data = evaluate.load_eval_data(ds, config)
    batch_sh = parallel.batch_sharding(mesh)
    writer = metrics_lib.MetricsWriter(workdir, start, enabled=lead)
    progress = metrics_lib.Progress(start, config.train.steps, enabled=lead and config.train.progress)
    total = config.train.steps
    last: dict[str, float] = {}
    t_last, steps_since = time.time(), 0

    for step in range(start + 1, total + 1):
        local = next(data_iter)
        batch = {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in local.items()}
        state, out = train_step(state, batch)
        loss = float(out["train/loss"])  # one host sync a step buys the exact failing step below
        if not np.isfinite(loss):
            mgr.wait_until_finished()
            raise FloatingPointError(
                f"non-finite loss {loss} at step {step}; stopped without saving. "
                f"The last good checkpoint (step {mgr.latest_step()}) is kept in {workdir}."
            )
        steps_since += 1
        progress.update(step, f"loss {loss:.4f}")

        row: dict[str, float] = {}
        if step % config.train.log_every == 0 or step == total:
            now = time.time()
            row.update({k: float(v) for k, v in out.items()})
            row["train/examples_per_sec"] = steps_since * config.train.batch_size / max(now - t_last, 1e-9)
            t_last, steps_since = now, 0
        if step % config.train.eval_every == 0 or step == total:
            row.update(evaluate.evaluate_splits(model, state["params"], mesh, eval_data, ds, config))
        if row:
            writer.write(step, row)
            last = {"step": step, **row}
            progress.update(step, f"loss {loss:.4f}", force=True)
        if step % config.train.checkpoint_every == 0 or step == total:
            checkpoint.save(mgr, step, state, data_iter.get_state(), record)
        if step % config.train.eval_every == 0 or step % config.train.checkpoint_every == 0:
            t_last = time.time()  # evaluation and checkpoints are not training throughput

    mgr.wait_until_finished()
    progress.close()
    writer.close()
    mgr.close()
    return last


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse_args(argv, prog="python -m vlm_jax.train")
    config = load_config_or_exit(args)
    try:
        last = train(config, args.workdir)
    except config_lib.ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if jax.process_index() == 0 and last:
        print(json.dumps(last, indent=1))
    return last


if __name__ == "__main__":
    main(sys.argv[1:])
