"""The seeds' batch-size study: sigmoid (SigLIP) against softmax (CLIP) loss
at several batch sizes and equal examples seen, on the embedded data.

    experiments/ablations/batch_study.sh [OUT]

runs, for each loss, ``python -m vlm_jax.sweep`` over (batch size, steps,
warm-up) zipped so that every arm sees the same number of examples, three
seeds each, then ``python -m vlm_jax.compare`` over all arms. This file is
the arms' config; its argument is the loss (each has its published
initialisation: CLIP log t = log(1/0.07); SigLIP log t = log 10, b = −10).
It starts from the schema's defaults (the plain tiny ViT, no crops), not
from configs/default.py, so that the study's numbers in docs/ablations.md
stay reproducible when the default recipe changes.
"""

import math

from vlm_jax.config import base_config


def get_config(loss: str = "softmax"):
    c = base_config()
    c.loss.kind = loss
    if loss == "sigmoid":
        c.loss.log_t_init = math.log(10.0)
        c.loss.bias_init = -10.0
    c.train.log_every = 25
    c.train.checkpoint_every = 100
    c.train.eval_every = 100_000  # evaluate once, at the last step
    c.train.progress = False
    for name in ("linear_probe", "fewshot"):  # zero-shot, retrieval and compositional probes only
        del c.evals[name]
    return c
