"""The seeds' batch-size study: sigmoid (SigLIP) against softmax (CLIP) loss
at several batch sizes and equal examples seen, on the embedded data.

    experiments/ablations/batch_study.sh [OUT]

runs, for each loss, ``python -m vlm_jax.sweep`` over (batch size, steps,
warm-up) zipped so that every arm sees the same number of examples, three
seeds each, then ``python -m vlm_jax.compare`` over all arms. This file is
the arms' config; its argument is the loss (each has its published
initialisation: CLIP log t = log(1/0.07); SigLIP log t = log 10, b = −10).
"""

import importlib.util
import os

_default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs", "default.py")
_spec = importlib.util.spec_from_file_location("default_config", _default)
default = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(default)


def get_config(loss: str = "softmax"):
    c = default.get_config(loss)
    c.train.log_every = 25
    c.train.checkpoint_every = 100
    c.train.eval_every = 100_000  # evaluate once, at the last step
    c.train.progress = False
    for name in ("linear_probe", "fewshot"):  # zero-shot, retrieval and compositional probes only
        del c.evals[name]
    return c
