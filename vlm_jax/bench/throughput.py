"""Train-step throughput and MFU for a config, with variants side by side.

For each variant (config overrides such as ``model.remat=full``, and XLA
compiler options: entries named ``xla_*``) it compiles the real jitted train
step (synthetic batch, so the input pipeline is not measured), then reports
compile time, step time, examples/s, memory (compiled per-device temporaries;
the accelerator's peak where reported), MFU = model FLOPs per step / step
time / peak FLOP/s, and whether the state after one step is bit for bit the
first variant's. Model FLOPs come from XLA's cost analysis of the compiled
step and are cross-checked by an analytic count; the peak is a large matmul
timed on the same devices in the same run.

With ``--rounds R`` > 1 every variant is compiled and kept, then timed in
turn, R rounds of one untimed step and ``--steps`` timed ones each; a
variant's step time is the median over rounds of each round's median. On a
machine whose speed drifts (a shared VM), alternating rounds compare
variants under the same conditions; timing them one after the other does not.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from typing import Callable, Sequence

XLA_OPTION_PREFIX = "xla_"  # XLA's debug options are all named so; no config field is


def split_variant(entries: Sequence[str]) -> tuple[list[str], dict[str, bool | int | str]]:
    """A variant's entries as (config overrides, XLA compiler options). An entry
    ``xla_<option>=<value>`` is a compiler option ("true"/"false" a bool, digits an
    int, anything else passed as written); every other entry is a config override."""
    overrides, options = [], {}
    for entry in entries:
        if not entry.startswith(XLA_OPTION_PREFIX):
            overrides.append(entry)
            continue
        name, sep, value = entry.partition("=")
        if not sep or not value:
            raise SystemExit(f"error: variant entry {entry!r}: an XLA option needs a value, as in "
                             "xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED")
        low = value.lower()
        options[name] = (low == "true") if low in ("true", "false") else int(value) if value.isdigit() else value
    return overrides, options


def variant_label(overrides: Sequence[str], options: dict) -> str:
    """A variant's name in the table: its overrides and parsed options, or "(baseline)" when it has none."""
    return " ".join([*overrides, *(f"{k}={v}" for k, v in options.items())]) or "(baseline)"


def state_digest(state) -> str:
    """SHA-256 over every leaf's bytes (in tree order): equal digests, bit-identical states."""
    import jax
    import numpy as np

    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(state):
        h.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
    return h.hexdigest()


def analytic_train_flops(config, batch: int) -> float:
    """3 × forward matmul FLOPs of both towers (each tower counts its own:
    ``forward_flops``) and their projections, + the loss's model count."""
    from vlm_jax import models

    image, image_width = models.IMAGE_TOWERS[config.model.image.tower].forward_flops(config)
    text, text_width = models.TEXT_TOWERS[config.model.text.tower].forward_flops(config)
    projections = 2 * config.model.embed_dim * (image_width * config.model.image_projection + text_width)
    loss = 6.0 * batch * batch * config.model.embed_dim
    return 3.0 * (image + text + projections) * batch + loss


def matmul_peak_flops(mesh, dtype: str = "float32", size: int = 2048, reps: int = 5) -> float:
    """FLOP/s of a large matmul run on every device of ``mesh`` at once."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    n = mesh.devices.size
    axes = tuple(mesh.axis_names)
    a = jax.device_put(jnp.ones((n * size, size), dtype), NamedSharding(mesh, P(axes)))
    b = jax.device_put(jnp.ones((size, size), dtype), NamedSharding(mesh, P()))
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, b))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        times.append(time.perf_counter() - t0)
    return 2.0 * n * size ** 3 / min(times)


def synthetic_regions(data_cfg, tokens, rng) -> dict:
    """Random grounding in ``pipeline.regions``' layout for a batch of
    ``tokens``: every box slot filled (corners in [0, 1], ordered), class
    keys in [0, 10), the phrase slots the rows' captions, the last slot keyed
    as background."""
    import numpy as np

    from vlm_jax.data import pipeline

    b = tokens.shape[0]
    nb, npr = data_cfg.max_boxes, data_cfg.max_phrases
    corners = np.sort(rng.random((b, nb, 2, 2), dtype=np.float32), axis=2)  # (y, x) low, then high
    phrase_labels = rng.integers(0, 10, (b, npr + 1)).astype(np.int32)
    phrase_labels[:, npr] = pipeline.BACKGROUND
    return {"boxes": corners.reshape(b, nb, 4), "box_labels": rng.integers(0, 10, (b, nb)).astype(np.int32),
            "phrases": np.repeat(tokens[:, None, :], npr + 1, axis=1), "phrase_labels": phrase_labels}


def synthetic_batch(config, run, batch: int, seed: int = 0) -> dict:
    """A host batch with every field the objective asks for: random pixels and
    tokens (EOS last), random labels and pair weights, the other rows'
    captions as negative captions, and the objective's own augmentation."""
    import numpy as np

    size, length = config.data.image_size, config.model.text.max_len
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, run.ds.tokenizer.vocab_size, (batch, length)).astype(np.int32)
    tokens[:, -1] = run.ds.tokenizer.eos_id
    host = {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8), "text": tokens}
    for field in run.fields:
        if field == "weight":
            host[field] = rng.random(batch, dtype=np.float32)
        elif field == "negative_text":  # another example's caption: a row of tokens like "text"
            host[field] = tokens[rng.permutation(batch)]
        elif field == "regions":  # pipeline.regions' layout: boxes and phrases with class keys, background last
            host.update(synthetic_regions(config.data, tokens, rng))
        else:
            host[field] = rng.integers(0, 10, batch).astype(np.int32)
    if run.objective.augment is not None:
        rows = [run.objective.augment({k: v[i] for k, v in host.items()}, rng) for i in range(batch)]
        host = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    return host


def _prepare(spec: str, overrides: Sequence[str], batch: int):
    """(config, session, jitted step, state, device batch) for one variant."""
    import jax

    from vlm_jax import config as config_lib, parallel, session, step as step_lib

    cfg = config_lib.load_config(spec, list(overrides) + [f"train.batch_size={batch}"])
    run = session.setup(cfg)
    step = step_lib.make_train_step(cfg, run.objective, run.tx, run.schedule, run.mesh, run.state_sh)
    sh = parallel.batch_sharding(run.mesh)
    batch_arrays = {k: jax.device_put(v, sh) for k, v in synthetic_batch(cfg, run, batch).items()}
    state = jax.jit(run.init_state, out_shardings=run.state_sh)(jax.random.PRNGKey(0))
    return cfg, run, step, state, batch_arrays


def time_steps(step, state, batch, steps: int):
    """(state, seconds of each of ``steps`` steps), each timed to the device's completion."""
    import jax

    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, out = step(state, batch)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return state, times


def measure_loop(spec: str, overrides: Sequence[str], batch: int, steps: int, host_read: bool) -> dict:
    """Examples/s of the train loop's device work over ``steps`` steps, with
    (``host_read``: ``float(loss)`` after every step, as the loop once did) or
    without a per-step read back to the host (the loop now reads at log steps)."""
    import jax

    _, run, step, state, batch_arrays = _prepare(spec, overrides, batch)
    state, out = step(state, batch_arrays)  # compile and warm up
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, out = step(state, batch_arrays)
        if host_read:
            float(out["train/loss"])
    jax.block_until_ready((state, out))
    elapsed = time.perf_counter() - t0
    return {"host_read": host_read, "batch": batch, "steps": steps, "examples_per_s": steps * batch / elapsed,
            "devices": run.mesh.devices.size}


def compile_variant(spec: str, overrides: Sequence[str], batch: int,
                    options: dict | None = None) -> dict:
    """One variant compiled (with XLA ``options``) and stepped once, untimed:
    everything ``time_variant`` needs, and the digest of the state after that step."""
    import jax

    cfg, run, step, state, batch_arrays = _prepare(spec, overrides, batch)
    t0 = time.perf_counter()
    lowered = step.lower(state, batch_arrays)
    try:
        compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if not options or "option" not in str(e):
            raise
        raise SystemExit(f"error: XLA options {options}: {e}; name an XLA debug option this jaxlib knows, "
                         "with a value of its type") from None
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    mem = compiled.memory_analysis()
    state, _ = compiled(state, batch_arrays)  # warm-up
    n_dev = run.mesh.devices.size
    return {
        "devices": n_dev,
        "batch": batch,
        "compile_s": compile_s,
        "temp_mib_per_device": mem.temp_size_in_bytes / 2**20 if mem else float("nan"),
        # XLA's count is of the per-device SPMD program: scale to the whole step.
        "xla_flops": xla_flops * n_dev,
        "analytic_flops": analytic_train_flops(cfg, batch),
        "mesh": run.mesh,
        "compute_dtype": cfg.model.dtype,
        "state_digest": state_digest(state),
        "_run": [compiled, state, batch_arrays],
        "_round_ms": [],
    }


def time_round(step, state, batch, steps: int, probe: Callable[[], None] | None = None):
    """(state, median seconds) of one round: an untimed step (the first after a pause runs on cold
    caches and on memory the host took back), then ``steps`` timed ones. ``probe``, if given, is
    called just before and just after the timed steps (to read host counters around them)."""
    state, _ = time_steps(step, state, batch, 1)
    if probe:
        probe()
    state, times = time_steps(step, state, batch, steps)
    if probe:
        probe()
    return state, statistics.median(times)


def time_variant(row: dict, steps: int) -> None:
    """One round of the row's step (``time_round``); its median joins the row's rounds."""
    compiled, state, batch_arrays = row["_run"]
    row["_run"][1], median_s = time_round(compiled, state, batch_arrays, steps)
    row["_round_ms"].append(median_s * 1e3)


def finish_variant(row: dict) -> dict:
    """The row's step time from its rounds, the accelerator's peak memory, its device buffers released."""
    row["step_ms"] = statistics.median(row["_round_ms"])
    row["examples_per_s"] = row["batch"] / (row["step_ms"] / 1e3)
    row["round_ms"] = row.pop("_round_ms")
    peaks = [d.memory_stats().get("peak_bytes_in_use", -1) for d in row["mesh"].devices.flat
             if hasattr(d, "memory_stats") and d.memory_stats()]
    row["peak_mib"] = max(peaks) / 2**20 if peaks else float("nan")
    del row["_run"]
    return row


def measure_variant(spec: str, overrides: Sequence[str], batch: int, steps: int,
                    options: dict | None = None) -> dict:
    row = compile_variant(spec, overrides, batch, options)
    time_variant(row, steps)
    return finish_variant(row)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python experiments/train_throughput.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/default.py")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--variants", default=";model.remat=full;model.scan=True;model.dtype=bfloat16",
                   help="';'-separated variants, each a ','-separated list of config overrides ('' = as is) "
                        "and XLA compiler options (entries named xla_*, e.g. xla_cpu_scheduler_type="
                        "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED)")
    p.add_argument("--rounds", type=int, default=1,
                   help="R > 1: keep every variant compiled and time them in turn, R rounds (the median over rounds)")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--loop-steps", type=int, default=0,
                   help="also time N loop steps of the first variant (its config overrides, not its XLA options) "
                        "with and without a per-step host read")
    args, rest = p.parse_known_args(argv)
    common = [o[len("--config."):] for o in rest if o.startswith("--config.")]
    if args.rounds < 1 or args.steps < 1:
        raise SystemExit(f"error: --rounds {args.rounds} and --steps {args.steps}: both must be at least 1")
    variants = [split_variant([v for v in variant.split(",") if v]) for variant in args.variants.split(";")]
    rows = []
    for overrides, options in variants:
        if args.rounds == 1:  # one variant at a time: only its buffers are alive
            row = measure_variant(args.config, common + overrides, args.batch, args.steps, options)
        else:
            row = compile_variant(args.config, common + overrides, args.batch, options)
        row["overrides"] = variant_label(overrides, options)  # its own entries, not the common ones
        rows.append(row)
    if args.rounds > 1:
        for _ in range(args.rounds):
            for row in rows:
                time_variant(row, args.steps)
        rows = [finish_variant(row) for row in rows]
    import jax

    peak_dtype = {"bfloat16": "bfloat16"}.get(rows[0]["compute_dtype"], "float32")
    peaks = {dt: matmul_peak_flops(rows[0]["mesh"], dt, args.matmul_size) for dt in sorted({peak_dtype, "float32", "bfloat16"})}
    lines = [
        f"devices: {rows[0]['devices']} × {jax.devices()[0].device_kind}; jax {jax.__version__}; "
        f"matmul peak {', '.join(f'{k} {v / 1e12:.3f} TFLOP/s' for k, v in peaks.items())}",
        f"command: python experiments/train_throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}",
        f"step ms: the median over {args.rounds} alternating rounds of each round's median of {args.steps} steps"
        if args.rounds > 1 else f"step ms: the median of {args.steps} steps, variants one after the other",
        "",
        "| variant | batch | compile s | step ms | examples/s | temp MiB/dev | peak MiB | XLA TFLOP/step | "
        "analytic TFLOP/step | MFU | state after 1 step = first variant's |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = peaks["bfloat16" if r["compute_dtype"] == "bfloat16" else "float32"]
        mfu = r["analytic_flops"] / (r["step_ms"] / 1e3) / peak
        lines.append(
            f"| {r['overrides']} | {r['batch']} | {r['compile_s']:.1f} | {r['step_ms']:,.1f} | {r['examples_per_s']:,.1f} | "
            f"{r['temp_mib_per_device']:,.1f} | {'—' if r['peak_mib'] != r['peak_mib'] else format(r['peak_mib'], ',.1f')} | "
            f"{r['xla_flops'] / 1e12:.4f} | "
            f"{r['analytic_flops'] / 1e12:.4f} | {100 * mfu:.1f}% | "
            f"{'yes' if r['state_digest'] == rows[0]['state_digest'] else 'no'} |")
    if args.loop_steps:
        loop = [measure_loop(args.config, common + variants[0][0], args.batch, args.loop_steps, read)
                for read in (True, False)]
        lines += ["", "| loop | batch | steps | examples/s | × with the read |", "|---|---|---|---|---|"]
        for r in loop:
            lines.append(f"| {'float(loss) every step' if r['host_read'] else 'read at log steps only'} | "
                         f"{r['batch']} | {r['steps']} | {r['examples_per_s']:,.1f} | "
                         f"{r['examples_per_s'] / loop[0]['examples_per_s']:.3f} |")
    print("\n".join(lines))
    return rows
