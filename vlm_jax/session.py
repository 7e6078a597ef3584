"""A session: everything a run needs before its first step, for every entry point.

The command line (``parse_args``), joining JAX's distributed runtime, loading
the config, and ``setup``: mesh, opened data, model, objective, optimiser,
abstract train state and its shardings, each failing as a ``ConfigError``
naming the field before anything is compiled. ``vlm_jax.train``,
``vlm_jax.evaluate``, the benchmarks and the tests all start here; this module
imports neither of the entry points.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from vlm_jax import checkpoint, config as config_lib, models, objectives, optim, parallel, rules
from vlm_jax.data import pipeline
from vlm_jax.errors import ConfigError, cli_errors
from vlm_jax.models import towers

State = dict[str, Any]  # {"step", "params", "opt_state", "rng", "skipped"}: a plain pytree


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None, prog: str, description: str = "",
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """--config FILE[:arg] --workdir DIR [multi-host flags] [--config.a.b=value ...];
    ``extra`` adds an entry point's own flags."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help="config file, optionally with ':arg' for get_config(arg)")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard events")
    env = os.environ.get
    parser.add_argument("--coordinator", default=env("VLM_JAX_COORDINATOR", ""),
                        help="multi-host: host:port of process 0 (env VLM_JAX_COORDINATOR)")
    parser.add_argument("--num_processes", type=int, default=int(env("VLM_JAX_NUM_PROCESSES", "1")),
                        help="multi-host: number of processes (env VLM_JAX_NUM_PROCESSES)")
    parser.add_argument("--process_id", type=int, default=int(env("VLM_JAX_PROCESS_ID", "0")),
                        help="multi-host: this process's index (env VLM_JAX_PROCESS_ID)")
    if extra is not None:
        extra(parser)
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
    with cli_errors():
        return config_lib.load_config(args.config, args.overrides)


# --------------------------------------------------------------------------- setup


def cast_params(params, dtype: str):
    """Stores the tower weights in ``dtype``; scalars (log_t, b) stay float32
    (flax layers compute in config.model.dtype whatever the storage)."""
    if dtype == "float32":
        return params
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if x.ndim else x, params)


def make_init_params(config, model: towers.TwoTower, objective: objectives.Objective) -> Callable[[jax.Array], Any]:
    """rng -> parameters: the towers' and, beside them, the objective's parts."""

    def init_params(rng: jax.Array):
        s = config.data.image_size
        images = jnp.zeros((1, s, s, 3), jnp.float32)
        tokens = jnp.zeros((1, config.model.text.max_len), jnp.int32)
        params = {k: v for k, v in model.init(rng, images, tokens)["params"].items()
                  if k not in objective.unused_model_parts}
        parts = objective.init_parts(jax.random.fold_in(rng, 1))
        clash = sorted(set(params) & set(parts))
        if clash:
            raise ValueError(f"objective {config.loss.kind!r} adds parameters {clash} that the model already has")
        return cast_params({**params, **parts}, config.model.param_dtype)

    return init_params


@dataclasses.dataclass
class Setup:
    mesh: Mesh
    ds: pipeline.Dataset
    model: towers.TwoTower
    objective: objectives.Objective
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    init_state: Callable[[jax.Array], State]
    abstract: State  # shapes and dtypes of the state
    state_sh: State  # its shardings
    fields: tuple[str, ...] = ()  # the example fields the train stream carries (pipeline.EXAMPLE_FIELDS)


def setup(config) -> Setup:
    """Mesh, opened data, model, objective, optimiser, abstract state and its shardings.

    Everything that can be wrong with the config or the data fails here, as a
    ConfigError naming the field, before anything is compiled.
    """
    try:
        mesh = parallel.make_mesh(config.mesh)
        config_lib.check_against_mesh(config, parallel.num_data_devices(mesh))
        ds = pipeline.open_dataset(config.data)
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from e
    try:
        model = models.make_model(config.model, ds.tokenizer.vocab_size)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    objective = objectives.make(config, model, mesh)
    if config.data.index_weights and not objective.pair_weights:
        weighted = ", ".join(name for name, cls in objectives.OBJECTIVES.items() if cls.pair_weights)
        raise ConfigError(f"config.data.index_weights: objective {config.loss.kind!r} does not weight its pairs; "
                          f"these do: loss.kind {weighted}")
    fields = tuple(objective.example_fields) + (("weight",) if config.data.index_weights else ())
    try:
        pipeline.check_fields(ds, config.data, fields)
        if config.data.index_file and config.data.train_split in ds.sources:  # a curated index fails here too
            pipeline.indexed_source(ds.sources[config.data.train_split], config.data, config.data.train_split)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    tx, schedule = optim.make_optimizer(config.optim, config.train.steps)
    init_params = make_init_params(config, model, objective)

    def init_state(rng: jax.Array) -> State:
        init_rng, train_rng = jax.random.split(rng)
        params = init_params(init_rng)
        trainable, _ = rules.split(params, config.train.freeze)  # frozen parameters get no optimizer state
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(trainable), "rng": train_rng,
                "skipped": jnp.zeros((), jnp.int32)}  # steps whose non-finite update was skipped

    try:  # model shape errors surface at init, rule typos against the real parameter paths
        abstract = jax.eval_shape(init_state, jax.random.PRNGKey(config.seed))
        rules.check_patterns(abstract["params"], config.train.freeze, "config.train.freeze")
        rules.check_patterns(abstract["params"], [r for r, _ in config.optim.lr_rules], "config.optim.lr_rules")
        state_sh = parallel.shardings_from_rules(abstract, mesh, config.mesh.rules, config.mesh.fsdp_min_size)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return Setup(mesh, ds, model, objective, tx, schedule, init_state, abstract, state_sh, fields)


def restore_params(config, run: Setup, workdir: str, step: int = -1) -> tuple[int, Any]:
    """(step, parameters) of checkpoint ``step`` (-1: the latest) of ``workdir``,
    checked against ``config`` first; ConfigErrors name the workdir and step."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise ConfigError(f"--workdir {workdir} holds no checkpoint")
    mgr = checkpoint.reader(workdir)
    steps = mgr.all_steps()
    if not steps:
        raise ConfigError(f"--workdir {workdir} holds no checkpoint")
    step = max(steps) if step < 0 else step
    if step not in steps:
        raise ConfigError(f"--step {step}: {workdir} holds checkpoints {sorted(steps)}")
    check_workdir(mgr, step, config, run.abstract, workdir)
    try:
        state, _ = checkpoint.restore(mgr, step, with_shardings(run.abstract, run.state_sh))
    except checkpoint.DamagedCheckpoint as e:
        raise ConfigError(f"checkpoint step {step} in {workdir} is damaged: {e}; use another --step") from e
    return step, state["params"]


def with_shardings(abstract: State, shardings: State) -> State:
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


# --------------------------------------------------------------------------- checkpoints of a workdir


def initialise_from_checkpoint(config, params, shardings):
    """Overwrites the parameters that ``config.model_init.rules`` select with
    those of another run's checkpoint (LiT: the image tower)."""
    src_dir = config.model_init.workdir
    try:
        source, step = rules.load_params(src_dir, config.model_init.step)
        host, loaded = rules.init_from(jax.device_get(params), source, config.model_init.rules, f"{src_dir} step {step}")
    except ValueError as e:
        raise ConfigError(str(e)) from e
    print(f"initialised {len(loaded)} parameter arrays from {src_dir} step {step}", file=sys.stderr)
    return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, s), host, shardings)


def check_compatible(saved_record: dict, current_record: dict, workdir: str) -> None:
    """Refuses (ConfigError) a checkpoint written by an incompatible config."""
    try:
        checkpoint.check_compatible(saved_record, current_record, workdir)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def check_workdir(mgr, step: int, config, abstract: State, workdir: str) -> None:
    """Refuses (ConfigError) checkpoint ``step`` if damaged or written by an incompatible config."""
    try:
        saved = checkpoint.read_compat(mgr, step)
    except checkpoint.DamagedCheckpoint as e:
        raise ConfigError(f"checkpoint step {step} in {workdir} is damaged: {e}") from e
    check_compatible(saved, checkpoint.compat_record(config, abstract["params"]), workdir)
