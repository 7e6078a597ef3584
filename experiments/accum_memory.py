"""Compiled memory of one train step with and without gradient accumulation.

    python experiments/accum_memory.py --batch 1024 --accum 1,2,4,8 [--config.model.image.depth=6 ...]

Compiles (does not run) the jitted train step of configs/default.py for each
accumulation factor and prints XLA's per-device temporary memory: with k > 1
only one micro-batch's activations are alive at a time.
"""

import argparse
import sys

import jax

from vlm_jax import config as config_lib, parallel, session, step as step_lib


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/default.py")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--accum", default="1,2,4,8")
    args, rest = p.parse_known_args(argv)
    overrides = [o[len("--config."):] for o in rest if o.startswith("--config.")]
    rows = []
    for k in [int(x) for x in args.accum.split(",")]:
        cfg = config_lib.load_config(args.config, overrides + [f"train.batch_size={args.batch}", f"train.accum_steps={k}"])
        run = session.setup(cfg)
        step = step_lib.make_train_step(cfg, run.objective, run.tx, run.schedule, run.mesh, run.state_sh)
        s = cfg.data.image_size
        sh = parallel.batch_sharding(run.mesh)
        batch = {
            "image": jax.ShapeDtypeStruct((args.batch, s, s, 3), "uint8", sharding=sh),
            "text": jax.ShapeDtypeStruct((args.batch, cfg.model.text.max_len), "int32", sharding=sh),
        }
        mem = step.lower(session.with_shardings(run.abstract, run.state_sh), batch).compile().memory_analysis()
        rows.append((k, mem.temp_size_in_bytes, mem.argument_size_in_bytes))
        print(f"accum_steps={k}: temp {mem.temp_size_in_bytes / 2**20:,.1f} MiB per device, "
              f"arguments {mem.argument_size_in_bytes / 2**20:,.1f} MiB", flush=True)
    print("\n| accum_steps | temp MiB/device | × k=1 |\n|---|---|---|")
    for k, temp, _ in rows:
        print(f"| {k} | {temp / 2**20:,.1f} | {temp / rows[0][1]:.2f} |")
    print(f"\ndevices: {len(jax.devices())} × {jax.devices()[0].device_kind}; jax {jax.__version__}; "
          f"command: python experiments/accum_memory.py {' '.join(argv)}")


if __name__ == "__main__":
    main(sys.argv[1:])
