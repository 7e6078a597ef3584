"""Sweeps: a grid of config overrides, repeated over seeds, each arm an
ordinary training run.

    python -m vlm_jax.sweep --config configs/default.py --out sweeps/loss_batch \\
        --sweep loss.kind softmax sigmoid --sweep train.batch_size 32 128 512 \\
        --seeds 0 1 2 --parallel 2 [--config.train.steps=300 ...]

``--sweep FIELD V1 V2 ...`` adds an axis (the arms are the product of all
axes); ``--zip FIELD V1 V2 ...`` fields vary together, as one axis (equal
lengths: ``--zip train.batch_size 64 256 --zip train.steps 800 200`` keeps the
examples seen equal); ``--seeds`` repeats every arm. Values are written as in
``--config.FIELD=VALUE``. Every arm's config is loaded and checked before
anything runs.

Each arm is ``OUT/arms/<name>``, a workdir of ``python -m vlm_jax.train``
(its own config.json, metrics.jsonl, checkpoints, log in train.log), run in
a subprocess that dies with the sweep; ``--parallel P`` runs P at once
(``--devices_per_arm K`` gives each its own K GPUs). A sweep killed in the
middle and restarted with the same command skips finished arms and resumes
the others exactly where their checkpoints are; a restart with another
command is refused. SIGTERM or Ctrl-C stops every arm at its next step
(each saves) and exits 75. At the end, OUT/summary.md, summary.csv and
plots/ compare the arms (``vlm_jax.compare``).
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Sequence

from vlm_jax import compare
from vlm_jax.config import load_config
from vlm_jax.errors import ConfigError, cli_errors

EXIT_PREEMPTED = 75  # vlm_jax.train's code for "stopped by a signal, saved"
DONE = ".sweep_done"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vlm_jax.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="config file[:arg], as for vlm_jax.train")
    p.add_argument("--out", required=True, help="sweep directory: arms/, sweep.json, summary")
    p.add_argument("--sweep", nargs="+", action="append", default=[], metavar=("FIELD", "VALUE"),
                   help="an axis: a config field and its values")
    p.add_argument("--zip", nargs="+", action="append", default=[], metavar=("FIELD", "VALUE"),
                   help="fields that vary together, as one axis")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--parallel", type=int, default=1, help="arms run at once")
    p.add_argument("--devices_per_arm", type=int, default=0,
                   help="give arm slot i the GPUs [i·K, (i+1)·K) through CUDA_VISIBLE_DEVICES (0: all see all)")
    p.add_argument("--metrics", nargs="+", default=list(compare.DEFAULT_METRICS), help="regexes for summary.md")
    args, rest = p.parse_known_args(argv)
    bad = [r for r in rest if not r.startswith("--config.")]
    if bad:
        p.error(f"unrecognised argument {bad[0]!r} (overrides look like --config.train.steps=200)")
    args.overrides = [r[len("--config."):] for r in rest]
    return args


def arms(args: argparse.Namespace) -> list[dict]:
    """[{"name", "overrides": ["field=value", ...], "seed"}] in a fixed order."""
    axes: list[list[list[tuple[str, str]]]] = []
    for spec in args.sweep:
        if len(spec) < 2:
            raise ConfigError(f"--sweep {' '.join(spec)}: give a field and at least one value")
        axes.append([[(spec[0], v)] for v in spec[1:]])
    if args.zip:
        lengths = {len(spec) - 1 for spec in args.zip}
        if len(lengths) != 1 or 0 in lengths:
            raise ConfigError(f"--zip: every zipped field needs the same number of values (got {sorted(lengths)})")
        axes.append([[(spec[0], spec[1 + i]) for spec in args.zip] for i in range(lengths.pop())])
    fields = [f for axis in axes for f, _ in axis[0]]
    if len(set(fields)) != len(fields) or "seed" in fields:
        raise ConfigError(f"--sweep/--zip: each field once, and not seed (use --seeds): {fields}")
    out = []
    for combo in itertools.product(*axes) if axes else [()]:
        pairs = [pair for group in combo for pair in group]
        for seed in args.seeds:
            label = "_".join(f"{f}={v}" for f, v in pairs + [("seed", str(seed))])
            name = f"{len(out):03d}_" + re.sub(r"[^A-Za-z0-9._=+-]+", "-", label)[:150]
            out.append({"name": name, "overrides": [f"{f}={v}" for f, v in pairs], "seed": seed})
    return out


def spec(args: argparse.Namespace, arm_list: list[dict]) -> dict:
    return {"config": args.config, "overrides": args.overrides, "sweep": args.sweep, "zip": args.zip,
            "seeds": args.seeds, "arms": arm_list}


def check_or_record(out: str, current: dict) -> None:
    path = os.path.join(out, "sweep.json")
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous != current:
            changed = sorted(k for k in current if previous.get(k) != current[k])
            raise ConfigError(f"--out {out} holds a sweep started with another command (differs in: "
                              f"{', '.join(changed)}); rerun that command, or use another --out")
        return
    os.makedirs(out, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(current, f, indent=1)
    os.replace(tmp, path)


def _die_with_parent() -> None:
    """In the child: SIGKILL when the sweep process dies, however it dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: a killed sweep's arms finish on their own; a restart waits for their locks


def command(args: argparse.Namespace, arm: dict, workdir: str) -> list[str]:
    overrides = [f"--config.{o}" for o in args.overrides + arm["overrides"] + [f"seed={arm['seed']}"]]
    return [sys.executable, "-m", "vlm_jax.train", "--config", args.config, "--workdir", workdir, *overrides]


def run(args: argparse.Namespace) -> int:
    arm_list = arms(args)
    for arm in arm_list:  # every arm's config loads and checks before anything runs
        try:
            load_config(args.config, args.overrides + arm["overrides"] + [f"seed={arm['seed']}"])
        except ConfigError as e:
            raise ConfigError(f"arm {arm['name']}: {e}") from None
    check_or_record(args.out, spec(args, arm_list))
    todo = [a for a in arm_list if not os.path.exists(os.path.join(args.out, "arms", a["name"], DONE))]
    print(f"sweep: {len(arm_list)} arms, {len(arm_list) - len(todo)} already done, {args.parallel} at a time",
          file=sys.stderr)
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    running: dict[int, tuple[subprocess.Popen, dict, object]] = {}  # slot -> (process, arm, log)
    failed: list[str] = []
    try:
        while todo or running:
            if stop["signal"] is not None:
                for proc, _, _ in running.values():
                    proc.send_signal(signal.SIGTERM)  # each arm saves at its next step and exits 75
                for proc, _, log in running.values():
                    proc.wait()
                    log.close()
                print(f"sweep: stopped by signal {stop['signal']}; rerun the same command to resume",
                      file=sys.stderr)
                return EXIT_PREEMPTED
            for slot in range(args.parallel):
                if slot not in running and todo:
                    arm = todo.pop(0)
                    workdir = os.path.join(args.out, "arms", arm["name"])
                    os.makedirs(workdir, exist_ok=True)
                    env = dict(os.environ)
                    if args.devices_per_arm:
                        k = args.devices_per_arm
                        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in range(slot * k, (slot + 1) * k))
                    log = open(os.path.join(workdir, "train.log"), "a")
                    proc = subprocess.Popen(command(args, arm, workdir), stdout=log, stderr=subprocess.STDOUT,
                                            env=env, preexec_fn=_die_with_parent)
                    running[slot] = (proc, arm, log)
                    print(f"sweep: started {arm['name']}", file=sys.stderr)
            for slot, (proc, arm, log) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                log.close()
                del running[slot]
                workdir = os.path.join(args.out, "arms", arm["name"])
                if code == 0:
                    open(os.path.join(workdir, DONE), "w").close()
                    print(f"sweep: finished {arm['name']}", file=sys.stderr)
                else:
                    failed.append(arm["name"])
                    print(f"sweep: {arm['name']} failed with exit code {code}; see {workdir}/train.log",
                          file=sys.stderr)
            time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if failed:
        print(f"error: {len(failed)} arms failed ({', '.join(failed)}); fix the cause and rerun the same command "
              f"(finished arms are kept)", file=sys.stderr)
        return 1
    compare.summarize([os.path.join(args.out, "arms", a["name"]) for a in arm_list], args.out, args.metrics,
                      lead=[spec[0] for spec in args.sweep + args.zip])  # the command's own order names the axes
    print(f"sweep: done; {os.path.join(args.out, 'summary.md')}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    with cli_errors():
        code = run(args)
    sys.exit(code)


if __name__ == "__main__":
    main()
