"""Train on your own data, ingested by ``python -m vlm_jax.data.ingest``:

    python -m vlm_jax.data.ingest webdataset /data/shards --name mydata --holdout_fraction 0.01 --fit_tokenizer 32000
    python -m vlm_jax.train --config configs/own_data.py:mydata --workdir workdirs/mydata

A CLIP ViT-B/32 (Radford et al. 2021 shapes) at 224 px with open_clip's
training crop (area 0.9–1, aspect 3/4–4/3, bicubic), the SentencePiece model
that ``--fit_tokenizer`` put beside the data, and image–text retrieval on the
``holdout`` split every 2,000 steps. Decoding runs in worker processes. Change
anything with ``--config.a.b=value`` (``data.data_dir`` if not ./data).
"""

import os

from vlm_jax.config import base_config, eval_entry


def get_config(name: str = "mydata"):
    c = base_config()
    c.data.dataset = name
    c.data.dataset_config = ""
    c.data.label_key = ""  # ingested captions have no class labels (tables and folders may add one)
    c.data.image_size = 224
    c.data.crop_area = (0.9, 1.0)
    c.data.crop_ratio = (3 / 4, 4 / 3)
    c.data.resample = "bicubic"
    c.data.workers = max(1, min(16, (os.cpu_count() or 2) - 1))

    c.model.image.update(dict(patch_size=32, width=768, depth=12, mlp_dim=3072, num_heads=12))
    c.model.text.update(dict(width=512, depth=12, mlp_dim=2048, num_heads=8, max_len=77))
    c.model.embed_dim = 512

    c.train.batch_size = 1024
    c.train.steps = 20_000
    c.train.log_every = 100
    c.train.checkpoint_every = 1000
    c.train.eval_every = 2000
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 2000
    c.optim.weight_decay = 0.2

    for name in ("zeroshot", "linear_probe", "fewshot", "compositional"):  # need class labels / the embedded data
        del c.evals[name]
    c.evals.retrieval = eval_entry("retrieval", splits=("holdout",), max_examples=5000)
    return c
