"""Time the train loop spends compiling evaluation, first evaluation vs the rest.

    python experiments/eval_compile.py --config configs/default.py --steps 500 --eval-every 50

Runs ``vlm_jax.train.train`` in a fresh workdir with every ``config.evals``
entry due every ``--eval-every`` steps, and attributes JAX's compile events
(tracing, lowering, backend compilation) to the evaluation that triggered
them. Prints the loop's wall time, each evaluation's compile time and the
share of the loop spent compiling evaluation after the first one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import jax

from vlm_jax import config as config_lib, evaluators, train


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/default.py")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=50)
    args, rest = p.parse_known_args(argv)
    overrides = [o[len("--config."):] for o in rest if o.startswith("--config.")]
    cfg = config_lib.load_config(args.config, overrides + [f"train.steps={args.steps}",
                                                           f"train.eval_every={args.eval_every}",
                                                           "train.progress=False"])
    current: list[int] = []  # the index of the evaluation running now, if any
    per_eval: list[float] = []
    run_eval = evaluators.Suite.run

    def timed_run(self, *a, **kw):
        current.append(len(per_eval))
        per_eval.append(0.0)
        try:
            return run_eval(self, *a, **kw)
        finally:
            current.pop()

    def listener(name, duration, **_):
        if current and name.startswith("/jax/core/compile/"):
            per_eval[current[-1]] += duration

    evaluators.Suite.run = timed_run
    jax.monitoring.register_event_duration_secs_listener(listener)
    t0 = time.perf_counter()
    train.train(cfg, tempfile.mkdtemp(prefix="eval_compile_"))
    wall = time.perf_counter() - t0
    later = sum(per_eval[1:])
    print(f"devices: {len(jax.devices())} × {jax.devices()[0].device_kind}; jax {jax.__version__}")
    print(f"command: python experiments/eval_compile.py {' '.join(argv)}")
    print(f"loop wall time {wall:.1f} s; {len(per_eval)} evaluations")
    print("compile seconds per evaluation: " + ", ".join(f"{x:.2f}" for x in per_eval))
    print(f"first evaluation compiled {per_eval[0]:.2f} s; later ones {later:.2f} s in all = "
          f"{100 * later / wall:.2f} % of the loop")


if __name__ == "__main__":
    main(sys.argv[1:])
