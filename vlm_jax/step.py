"""The train step: gradients of the objective (exact for any accumulation) and
the optimiser update, jitted over the mesh with the state donated.

``make_grad_fn`` uses only the objective's contract (``encode``, ``combine``,
``scalars``), so every objective accumulates exactly without knowing it.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlm_jax import parallel, rules
from vlm_jax.objectives import Objective
from vlm_jax.session import State

FINITE = "finite"  # the step output key of the finiteness flag (not a logged metric)


def make_grad_fn(objective: Objective, mesh: Mesh, accum_steps: int = 1, frozen: Sequence[str] = ()):
    """(params, batch) -> ((loss, metrics), grads), exact for any accum_steps.

    ``grads`` covers the trainable parameters only: no gradient is computed for
    parameters matching the ``frozen`` regexes. ``metrics`` are the objective's.

    With accum_steps = k > 1 the global batch is processed as k micro-batches,
    each spread over all data devices:
      1. encode every micro-batch, keeping no activations (``lax.map``);
      2. the full-batch loss and its gradients with respect to the outputs and
         the objective's scalars (log_t, bias), once (with the configured loss
         impl, negatives from the whole global batch);
      3. re-encode each micro-batch and pull its cached output gradients back
         into the tower parameters (``jax.vjp``), summed by ``lax.scan``.
    The scalars get their gradient from step 2 only, once: never k times.
    """
    if accum_steps == 1:
        def full(params, batch):
            trainable, fixed = rules.split(params, frozen)

            def loss_fn(tp):
                p = rules.merge(tp, fixed)
                return objective.combine(objective.encode(p, batch), objective.scalars(p), batch)

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
        scalars = objective.scalars(params)
        (loss, metrics), (d_out, d_scalars) = jax.value_and_grad(objective.combine, argnums=(0, 1), has_aux=True)(
            outputs, scalars, batch)
        _, pull_scalars = jax.vjp(lambda tp: objective.scalars(rules.merge(tp, fixed)), trainable)
        grads = pull_scalars(d_scalars)[0]

        def micro_step(acc, xs):
            mb, d_mb = xs
            _, pull = jax.vjp(lambda tp: objective.encode(rules.merge(tp, fixed), mb), trainable)
            return tmap(jnp.add, acc, pull(d_mb)[0]), None

        grads, _ = jax.lax.scan(micro_step, grads, (micro, tmap(to_micro, d_out)))
        return (loss, metrics), grads

    return accumulated


def all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def keep_if(ok: jax.Array, new, old):
    return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)


def make_train_step(config, objective: Objective, tx: optax.GradientTransformation, schedule, mesh: Mesh,
                    state_sh: State):
    """jit((state, batch) -> (state, out)); ``out`` holds the logged metrics
    ("train/loss", "train/learning_rate", "train/grad_norm", "train/<objective
    metric>") and ``out[FINITE]``: whether the loss, the gradients and the
    updated parameters are all finite. With ``config.train.nonfinite="skip"``
    a non-finite update is not applied and "train/skipped_steps" counts them. The loop reads ``out`` only when it
    logs, so the host does not wait for the device between log steps."""
    frozen = config.train.freeze
    skip_nonfinite = config.train.nonfinite == "skip"
    grad_fn = make_grad_fn(objective, mesh, config.train.accum_steps, frozen)

    def train_step(state: State, batch: dict[str, jax.Array]) -> tuple[State, dict[str, jax.Array]]:
        (loss, metrics), grads = grad_fn(state["params"], batch)
        trainable, fixed = rules.split(state["params"], frozen)
        updates, opt_state = tx.update(grads, state["opt_state"], trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(new_trainable)
        if skip_nonfinite:  # a non-finite update is not applied: the step keeps the old weights and moments
            new_trainable = keep_if(finite, new_trainable, trainable)
            opt_state = keep_if(finite, opt_state, state["opt_state"])
        new_state = {
            "step": state["step"] + 1,
            "params": rules.merge(new_trainable, fixed),
            "opt_state": opt_state,
            "rng": state["rng"],
            "skipped": state["skipped"] + (~finite).astype(jnp.int32),
        }
        out = {
            "train/loss": loss,
            "train/learning_rate": schedule(state["step"]),
            "train/grad_norm": grad_norm,
            **{f"train/{k}": v for k, v in metrics.items()},
            FINITE: finite,
        }
        if skip_nonfinite:
            out["train/skipped_steps"] = new_state["skipped"]
        return new_state, out

    return jax.jit(
        train_step,
        in_shardings=(state_sh, parallel.batch_sharding(mesh)),
        out_shardings=(state_sh, parallel.replicated(mesh)),
        donate_argnums=0,
    )
