"""Few-shot transfer of a finished run to a labelled dataset.

    python -m vlm_jax.evaluate --config configs/transfer.py:workdirs/default --workdir workdirs/default

The argument is the run's workdir: its recorded config (``config.json``),
with ``config.evals`` replaced by the transfer suite on ``DATASET``, a
labelled dataset prepared under ``DATA_DIR`` (for example by ``python -m
vlm_jax.data.ingest folder DIR --label_from_dir``; ``experiments/transfer_digits.py``
prepares the one named here):

* ``zeroshot``: the baseline every method is measured against;
* ``fewshot``: logistic regression on the frozen features at the same shots;
* ``tip_adapter``, ``clip_adapter``, ``coop`` and, for a ViT image tower,
  ``vpt`` (``vlm_jax.evaluators.transfer``).

Fork it for your data: change the constants below.
"""

import os

from vlm_jax.config import eval_entry, from_workdir

DATASET = "digits"  # a prepared TFDS name with a ClassLabel feature
DATA_DIR = ""  # "" = the run's config.data.data_dir
LABEL_KEY = "label"
TRAIN_SPLIT, SPLITS = "train", ("test",)
TEMPLATES = ("a {}",)
SHOTS, SEEDS = (1, 4, 16), 3


def get_config(workdir: str = "workdirs/default"):
    config = from_workdir(workdir)
    common = dict(dataset=DATASET, dataset_config="", data_dir=DATA_DIR or os.path.expanduser(config.data.data_dir),
                  label_key=LABEL_KEY, splits=SPLITS, max_examples=10_000)
    shots = dict(common, train_split=TRAIN_SPLIT, shots=SHOTS, seeds=SEEDS, templates=TEMPLATES)
    for name in list(config.evals.keys()):
        del config.evals[name]
    config.evals.zeroshot = eval_entry("zeroshot", templates=TEMPLATES, **common)
    config.evals.fewshot = eval_entry("fewshot", train_split=TRAIN_SPLIT, shots=SHOTS, seeds=SEEDS, **common)
    config.evals.tip_adapter = eval_entry("tip_adapter", **shots)
    config.evals.clip_adapter = eval_entry("clip_adapter", **shots)
    config.evals.coop = eval_entry("coop", n_ctx=4, **shots)
    if config.model.image.tower == "vit":
        config.evals.vpt = eval_entry("vpt", **shots)
    return config
