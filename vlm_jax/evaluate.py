"""Evaluate a checkpoint with the evaluators of its config.

    python -m vlm_jax.evaluate --config configs/default.py --workdir DIR [--step N] [--config.a.b=value ...]

Runs every entry of ``config.evals`` (zero-shot classification, retrieval,
linear probe, few-shot, compositional probes; see ``vlm_jax.evaluators``) on
checkpoint N of DIR (default: the latest), prints the metrics, then saves
DIR/eval_step<N>.json (``{"step", "metrics", "details"}``: details hold
per-class accuracy and the probes' chosen regularisation) and
DIR/eval_step<N>.md (one table per evaluator). The evaluators are the ones
the train loop runs, so the numbers equal the run's own.
"""

from __future__ import annotations

if __name__ == "__main__":  # glibc reads its tunables at start-up: re-execute before anything heavy is imported
    from vlm_jax import hostmem

    hostmem.reexec_with_huge_pages()

import argparse
import json
import os
import sys
from typing import Sequence

import jax

from vlm_jax import evaluators, session
from vlm_jax.errors import cli_errors


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--step", type=int, default=-1, help="checkpoint step to evaluate (default: the latest)")


def evaluate_checkpoint(config, workdir: str, step: int = -1) -> tuple[int, dict[str, float], dict]:
    """(step, metrics, details) of checkpoint ``step`` (-1: the latest) of ``workdir``."""
    run = session.setup(config)
    suite = evaluators.Suite(config, run.mesh, run.objective.embedder(), run.ds)
    step, params = session.restore_params(config, run, workdir, step)
    metrics = suite.run(params)
    return step, metrics, suite.details()


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = session.parse_args(argv, prog="python -m vlm_jax.evaluate", description=__doc__.split("\n\n")[0],
                              extra=_flags)
    session.initialize_distributed(args)
    config = session.load_config_or_exit(args)
    with cli_errors():
        step, metrics, details = evaluate_checkpoint(config, args.workdir, args.step)
    if jax.process_index() == 0:
        print(f"step {step}")
        for k in sorted(metrics):
            print(f"{k:40s} {metrics[k]:.4f}")
        stem = os.path.join(args.workdir, f"eval_step{step}")
        try:
            with open(stem + ".json", "w") as f:
                json.dump({"step": step, "metrics": metrics, "details": details}, f, indent=1)
            with open(stem + ".md", "w") as f:
                f.write(evaluators.markdown(step, metrics))
        except OSError as e:
            raise SystemExit(f"error: could not write {e.filename} ({e.strerror}); the metrics are printed above") from None
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
