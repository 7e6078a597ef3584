"""Train-step throughput and MFU for a config, with variants side by side.

For each variant (config overrides such as ``model.remat=full``) it compiles
the real jitted train step (synthetic batch, so the input pipeline is not
measured), then reports compile time, step time, examples/s, memory
(compiled per-device temporaries; the accelerator's peak where reported) and
MFU = model FLOPs per step / step time / peak FLOP/s. Model FLOPs come from
XLA's cost analysis of the compiled step and are cross-checked by an analytic
count; the peak is a large matmul timed on the same devices in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Sequence


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


def measure_variant(spec: str, overrides: Sequence[str], batch: int, steps: int) -> dict:
    import jax

    cfg, run, step, state, batch_arrays = _prepare(spec, overrides, batch)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch_arrays).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    mem = compiled.memory_analysis()
    state, _ = compiled(state, batch_arrays)  # warm-up
    jax.block_until_ready(state)
    state, times = time_steps(compiled, state, batch_arrays, steps)
    step_s = statistics.median(times)
    peaks = [d.memory_stats().get("peak_bytes_in_use", -1) for d in run.mesh.devices.flat
             if hasattr(d, "memory_stats") and d.memory_stats()]
    n_dev = run.mesh.devices.size
    return {
        "overrides": " ".join(overrides) or "(config as is)",
        "devices": n_dev,
        "batch": batch,
        "compile_s": compile_s,
        "step_ms": step_s * 1e3,
        "examples_per_s": batch / step_s,
        "temp_mib_per_device": mem.temp_size_in_bytes / 2**20 if mem else float("nan"),
        "peak_mib": max(peaks) / 2**20 if peaks else float("nan"),
        # XLA's count is of the per-device SPMD program: scale to the whole step.
        "xla_flops": xla_flops * n_dev,
        "analytic_flops": analytic_train_flops(cfg, batch),
        "mesh": run.mesh,
        "compute_dtype": cfg.model.dtype,
    }


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python experiments/train_throughput.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/default.py")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--variants", default=";model.remat=full;model.scan=True;model.dtype=bfloat16",
                   help="';'-separated variants, each a ','-separated list of config overrides ('' = as is)")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--loop-steps", type=int, default=0,
                   help="also time N loop steps of the first variant with and without a per-step host read")
    args, rest = p.parse_known_args(argv)
    common = [o[len("--config."):] for o in rest if o.startswith("--config.")]
    rows = []
    for variant in args.variants.split(";"):
        extra = [v for v in variant.split(",") if v]
        row = measure_variant(args.config, common + extra, args.batch, args.steps)
        row["overrides"] = " ".join(extra) or "(baseline)"
        rows.append(row)
    import jax

    peak_dtype = {"bfloat16": "bfloat16"}.get(rows[0]["compute_dtype"], "float32")
    peaks = {dt: matmul_peak_flops(rows[0]["mesh"], dt, args.matmul_size) for dt in sorted({peak_dtype, "float32", "bfloat16"})}
    lines = [
        f"devices: {rows[0]['devices']} × {jax.devices()[0].device_kind}; jax {jax.__version__}; "
        f"matmul peak {', '.join(f'{k} {v / 1e12:.3f} TFLOP/s' for k, v in peaks.items())}",
        f"command: python experiments/train_throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}",
        "",
        "| variant | batch | compile s | step ms | examples/s | temp MiB/dev | peak MiB | XLA TFLOP/step | analytic TFLOP/step | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = peaks["bfloat16" if r["compute_dtype"] == "bfloat16" else "float32"]
        mfu = r["analytic_flops"] / (r["step_ms"] / 1e3) / peak
        lines.append(
            f"| {r['overrides']} | {r['batch']} | {r['compile_s']:.1f} | {r['step_ms']:,.1f} | {r['examples_per_s']:,.1f} | "
            f"{r['temp_mib_per_device']:,.1f} | {'—' if r['peak_mib'] != r['peak_mib'] else format(r['peak_mib'], ',.1f')} | "
            f"{r['xla_flops'] / 1e12:.4f} | "
            f"{r['analytic_flops'] / 1e12:.4f} | {100 * mfu:.1f}% |")
    if args.loop_steps:
        extra = [v for v in args.variants.split(";")[0].split(",") if v]
        loop = [measure_loop(args.config, common + extra, args.batch, args.loop_steps, read) for read in (True, False)]
        lines += ["", "| loop | batch | steps | examples/s | × with the read |", "|---|---|---|---|---|"]
        for r in loop:
            lines.append(f"| {'float(loss) every step' if r['host_read'] else 'read at log steps only'} | "
                         f"{r['batch']} | {r['steps']} | {r['examples_per_s']:,.1f} | "
                         f"{r['examples_per_s'] / loop[0]['examples_per_s']:.3f} |")
    print("\n".join(lines))
    return rows
