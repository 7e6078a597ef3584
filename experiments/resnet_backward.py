"""The ResNet tower's convolutions and norms against flax's, in the real train step.

    python experiments/resnet_backward.py --config configs/default.py --batch 128 --pairs 6

Builds the jitted train step of the config three times in one process:
with flax's ``nn.Conv`` and ``nn.GroupNorm`` in the tower (what
``vlm_jax/models/resnet.py`` used before), with flax's convolutions and
vlm_jax's ``GroupNorm``, and as the tower is now (``Conv``, whose kernel
gradient is matrix products, and ``GroupNorm``). The three have the same
parameters and initial values; each takes one step from the same state
(losses printed, equal to float32 rounding), then they alternate
``--pairs`` times, ``--steps`` timed steps each, and the median over
pairs of each one's median step is reported with its ratio to flax's.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import flax.linen as nn
import jax

from vlm_jax import config as config_lib
from vlm_jax.bench import throughput
from vlm_jax.models import resnet


def flax_conv(features: int, kernel_size: int, stride: int = 1, dtype=None, name: str | None = None) -> nn.Conv:
    """``resnet.Conv``'s interface over ``nn.Conv`` (same parameter path and initial values)."""
    k, p = kernel_size, kernel_size // 2
    return nn.Conv(features, (k, k), strides=(stride, stride), padding=((p, p), (p, p)), use_bias=False, dtype=dtype,
                   name=name)


def flax_norm(channels: int, groups: int, dtype, name: str, zero: bool = False) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=math.gcd(groups, channels), epsilon=1e-5, dtype=dtype, name=name,
                        scale_init=nn.initializers.zeros if zero else nn.initializers.ones)


VARIANTS = {  # name: (convolution module, norm factory)
    "flax nn.Conv + nn.GroupNorm": (flax_conv, flax_norm),
    "flax nn.Conv + vlm_jax GroupNorm": (flax_conv, resnet._norm),
    "vlm_jax Conv + GroupNorm (the tower)": (resnet.Conv, resnet._norm),
}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.py")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("overrides", nargs="*", help="config overrides, field=value")
    args = p.parse_args(argv)
    tower = config_lib.load_config(args.config, args.overrides).model.image.tower
    if tower != "resnet":
        sys.exit(f"error: config {args.config}: model.image.tower={tower!r}; this benchmark needs the resnet tower "
                 f"(override model.image.tower=resnet)")
    conv, norm = resnet.Conv, resnet._norm
    built = {}
    try:
        for name, (conv_fn, norm_fn) in VARIANTS.items():
            resnet.Conv, resnet._norm = conv_fn, norm_fn  # read when the tower is traced, below
            _, _, step, state, batch = throughput._prepare(args.config, args.overrides, args.batch)
            compiled = step.lower(state, batch).compile()
            state, out = compiled(state, batch)
            print(f"{name}: loss of the first step {float(out['train/loss']):.7f}", flush=True)
            built[name] = [compiled, state, batch]
    finally:
        resnet.Conv, resnet._norm = conv, norm
    medians = {name: [] for name in built}
    for _ in range(args.pairs):
        for name, b in built.items():
            b[1], times = throughput.time_steps(b[0], b[1], b[2], args.steps)
            medians[name].append(statistics.median(times) * 1e3)
    base = statistics.median(next(iter(medians.values())))
    print(f"\n{jax.devices()[0].device_kind} x {jax.device_count()}, batch {args.batch}, {args.pairs} pairs of "
          f"{args.steps} steps\n")
    print("| tower | ms/step (pairs) | median ms | × flax's time |\n|---|---|---|---|")
    for name, ms in medians.items():
        print(f"| {name} | {' / '.join(f'{t:.0f}' for t in ms)} | {statistics.median(ms):.1f} | "
              f"{statistics.median(ms) / base:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
