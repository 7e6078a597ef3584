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
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlm_jax import checkpoint, config as config_lib, evaluate, losses, metrics as metrics_lib, optim, parallel, rules
from vlm_jax.data import pipeline
from vlm_jax.models import towers

State = dict[str, Any]  # {"step", "params", "opt_state", "rng"}: a plain pytree


# --------------------------------------------------------------------------- 1. config


def parse_args(argv: Sequence[str] | None, prog: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="config file, optionally with ':arg' for get_config(arg)")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard events")
    env = os.environ.get
    parser.add_argument("--coordinator", default=env("VLM_JAX_COORDINATOR", ""),
                        help="multi-host: host:port of process 0 (env VLM_JAX_COORDINATOR)")
    parser.add_argument("--num_processes", type=int, default=int(env("VLM_JAX_NUM_PROCESSES", "1")),
                        help="multi-host: number of processes (env VLM_JAX_NUM_PROCESSES)")
    parser.add_argument("--process_id", type=int, default=int(env("VLM_JAX_PROCESS_ID", "0")),
                        help="multi-host: this process's index (env VLM_JAX_PROCESS_ID)")
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for item in rest:
        if not item.startswith("--config."):
            parser.error(f"unrecognised argument {item!r} (overrides look like --config.train.steps=200)")
        overrides.append(item[len("--config."):])
    args.overrides = overrides
    return args


def initialize_distributed(args: argparse.Namespace) -> None:
    """Joins JAX's distributed runtime when a coordinator is given. Must run
    before anything touches the devices; on CPU the collectives go over gloo."""
    if not args.coordinator:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)


def load_config_or_exit(args: argparse.Namespace) -> config_lib.ConfigDict:
    try:
        return config_lib.load_config(args.config, args.overrides)
    except config_lib.ConfigError as e:
        raise SystemExit(f"error: {e}") from None


# --------------------------------------------------------------------------- 2-4. mesh, data, model, state


def cast_params(params, dtype: str):
    """Stores the tower weights in ``dtype``; the scalars log_t and b stay
    float32 (flax layers compute in config.model.dtype whatever the storage)."""
    if dtype == "float32":
        return params
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if x.ndim else x, params)


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
    try:
        model = towers.make_model(
            config.model, ds.tokenizer.vocab_size, config.loss.log_t_init,
            config.loss.bias_init if config.loss.kind == "sigmoid" else None,
            config.loss.ssl_dim if config.loss.kind == "slip" else 0,
        )
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from e
    tx, schedule = optim.make_optimizer(config.optim, config.train.steps)

    def init_state(rng: jax.Array) -> State:
        init_rng, train_rng = jax.random.split(rng)
        s = config.data.image_size
        images = jnp.zeros((1, s, s, 3), jnp.float32)
        tokens = jnp.zeros((1, config.model.text.max_len), jnp.int32)
        params = cast_params(model.init(init_rng, images, tokens)["params"], config.model.param_dtype)
        trainable, _ = rules.split(params, config.train.freeze)  # frozen parameters get no optimizer state
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(trainable), "rng": train_rng}

    try:  # model shape errors surface at init, rule typos against the real parameter paths
        abstract = jax.eval_shape(init_state, jax.random.PRNGKey(config.seed))
        rules.check_patterns(abstract["params"], config.train.freeze, "config.train.freeze")
        rules.check_patterns(abstract["params"], [r for r, _ in config.optim.lr_rules], "config.optim.lr_rules")
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from e
    try:
        state_sh = parallel.shardings_from_rules(abstract, mesh, config.mesh.rules, config.mesh.fsdp_min_size)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from e
    return Setup(mesh, ds, model, tx, schedule, init_state, abstract, state_sh)


def with_shardings(abstract: State, shardings: State) -> State:
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


# --------------------------------------------------------------------------- 5. loss and train step


@dataclasses.dataclass(frozen=True)
class Objective:
    """The configured objective in two parts, so that gradients can be accumulated.

    encode(params, batch) -> per-example outputs (embeddings, tokens, views);
    combine(outputs, log_t, bias, batch) -> (loss, extra metrics): the
    contrastive loss over the whole global batch; scalars(params) -> (log_t, bias).
    """

    encode: Callable
    combine: Callable
    scalars: Callable


def make_objective(config, model: towers.TwoTower, mesh: Mesh) -> Objective:
    kind = config.loss.kind
    loss_kw = dict(impl=config.loss.impl, mesh=mesh, axis=parallel.DATA_AXES, tile=config.loss.tile or None)
    TT = towers.TwoTower

    def encode(params, batch):
        v = {"params": params}
        images = pipeline.normalize_images(batch["image"])
        if kind == "filip":
            txt_tokens, txt_mask = model.apply(v, batch["text"], method=TT.encode_text_tokens)
            img_tokens = model.apply(v, images, method=TT.encode_image_tokens)
            return {"img_tokens": img_tokens, "txt_tokens": txt_tokens, "txt_mask": txt_mask}
        out = {"zimg": model.apply(v, images, method=TT.encode_image),
               "ztxt": model.apply(v, batch["text"], method=TT.encode_text)}
        if kind == "slip":
            for view in ("view1", "view2"):
                out[view] = model.apply(v, pipeline.normalize_images(batch[view]), method=TT.encode_view)
        return out

    def combine(out, log_t, bias, batch):
        if kind == "filip":
            return losses.filip_loss(out["img_tokens"], out["txt_tokens"], out["txt_mask"], log_t, **loss_kw), {}
        zimg, ztxt = out["zimg"], out["ztxt"]
        if kind == "softmax":
            return losses.softmax_loss(zimg, ztxt, log_t, **loss_kw), {}
        if kind == "sigmoid":
            return losses.sigmoid_loss(zimg, ztxt, log_t, bias, **loss_kw), {}
        if kind == "unicl":
            return losses.unicl_loss(zimg, ztxt, batch["label"], log_t, **loss_kw), {}
        # slip: CLIP on the image and image–image InfoNCE between two augmented views
        clip = losses.softmax_loss(zimg, ztxt, log_t, **loss_kw)
        ssl = losses.image_infonce_loss(out["view1"], out["view2"], jnp.float32(config.loss.ssl_log_t), **loss_kw)
        return clip + config.loss.ssl_weight * ssl, {"train/clip_loss": clip, "train/ssl_loss": ssl}

    def scalars(params):
        return model.apply({"params": params}, method=TT.scalars)

    return Objective(encode, combine, scalars)


def make_grad_fn(objective: Objective, mesh: Mesh, accum_steps: int = 1, frozen: Sequence[str] = ()):
    """(params, batch) -> ((loss, (log_t, bias, extra)), grads), exact for any accum_steps.

    ``grads`` covers the trainable parameters only: no gradient is computed for
    parameters matching the ``frozen`` regexes.

    With accum_steps = k > 1 the global batch is processed as k micro-batches,
    each spread over all data devices:
      1. encode every micro-batch, keeping no activations (``lax.map``);
      2. the full-batch loss and its gradients with respect to the outputs,
         log_t and bias, once (with the configured loss impl, negatives from
         the whole global batch);
      3. re-encode each micro-batch and pull its cached output gradients back
         into the tower parameters (``jax.vjp``), summed by ``lax.scan``.
    log_t and bias get their gradient from step 2 only, once: never k times.
    """
    if accum_steps == 1:
        def full(params, batch):
            trainable, fixed = rules.split(params, frozen)

            def loss_fn(tp):
                p = rules.merge(tp, fixed)
                log_t, bias = objective.scalars(p)
                loss, extra = objective.combine(objective.encode(p, batch), log_t, bias, batch)
                return loss, (log_t, bias, extra)

            return jax.value_and_grad(loss_fn, has_aux=True)(trainable)

        return full

    k, n = accum_steps, parallel.num_data_devices(mesh)
    micro_sh = NamedSharding(mesh, P(None, parallel.DATA_AXES))
    flat_sh = parallel.batch_sharding(mesh)

    def to_micro(x):
        # Device p holds rows [p·b, (p+1)·b); micro-batch m takes the m-th
        # b/k of every device's rows, so no rows move between devices.
        y = x.reshape(n, k, x.shape[0] // (n * k), *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(y.reshape(k, x.shape[0] // k, *x.shape[1:]), micro_sh)

    def from_micro(y):
        x = y.reshape(k, n, y.shape[1] // n, *y.shape[2:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x.reshape(k * y.shape[1], *y.shape[2:]), flat_sh)

    tmap = jax.tree_util.tree_map

    def accumulated(params, batch):
        trainable, fixed = rules.split(params, frozen)
        micro = tmap(to_micro, batch)
        outputs = tmap(from_micro, jax.lax.map(lambda mb: objective.encode(params, mb), micro))
        log_t, bias = objective.scalars(params)
        (loss, extra), (d_out, d_log_t, d_bias) = jax.value_and_grad(objective.combine, argnums=(0, 1, 2), has_aux=True)(
            outputs, log_t, bias, batch)
        _, pull_scalars = jax.vjp(lambda tp: objective.scalars(rules.merge(tp, fixed)), trainable)
        grads = pull_scalars((d_log_t, d_bias))[0]

        def micro_step(acc, xs):
            mb, d_mb = xs
            _, pull = jax.vjp(lambda tp: objective.encode(rules.merge(tp, fixed), mb), trainable)
            return tmap(jnp.add, acc, pull(d_mb)[0]), None

        grads, _ = jax.lax.scan(micro_step, grads, (micro, tmap(to_micro, d_out)))
        return (loss, (log_t, bias, extra)), grads

    return accumulated


def make_train_step(config, model: towers.TwoTower, tx: optax.GradientTransformation, schedule, mesh, state_sh):
    frozen = config.train.freeze
    grad_fn = make_grad_fn(make_objective(config, model, mesh), mesh, config.train.accum_steps, frozen)

    def train_step(state: State, batch: dict[str, jax.Array]) -> tuple[State, dict[str, jax.Array]]:
        (loss, (log_t, bias, extra)), grads = grad_fn(state["params"], batch)
        trainable, fixed = rules.split(state["params"], frozen)
        updates, opt_state = tx.update(grads, state["opt_state"], trainable)
        new_state = {
            "step": state["step"] + 1,
            "params": rules.merge(optax.apply_updates(trainable, updates), fixed),
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
        if config.loss.kind == "sigmoid":
            out["train/bias"] = bias
        return new_state, out

    return jax.jit(
        train_step,
        in_shardings=(state_sh, parallel.batch_sharding(mesh)),
        out_shardings=(state_sh, parallel.replicated(mesh)),
        donate_argnums=0,
    )


# --------------------------------------------------------------------------- 6. checkpoint / resume


def initialise_from_checkpoint(config, params, shardings):
    """Overwrites the parameters that ``config.model_init.rules`` select with
    those of another run's checkpoint (LiT: the image tower)."""
    src_dir = config.model_init.workdir
    try:
        source, step = rules.load_params(src_dir, config.model_init.step)
        host, loaded = rules.init_from(jax.device_get(params), source, config.model_init.rules, f"{src_dir} step {step}")
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from e
    print(f"initialised {len(loaded)} parameter arrays from {src_dir} step {step}", file=sys.stderr)
    return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, s), host, shardings)


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
        if config.model_init.workdir:
            state["params"] = initialise_from_checkpoint(config, state["params"], state_sh["params"])
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
    initialize_distributed(args)
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
