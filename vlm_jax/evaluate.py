"""Evaluation: zero-shot classification and image–text retrieval.

Zero-shot: each class name is put into every prompt template; the text
embeddings of a class are averaged over templates and re-normalised; an image
is assigned the class of highest cosine similarity (top-1 / top-5).

Retrieval: Recall@K for image→text and text→image over a split. Captions that
are the same string are indistinguishable to any model, so every copy of the
ground-truth caption (and every image carrying it) counts as a hit.

CLI: ``python -m vlm_jax.evaluate --config configs/default.py --workdir DIR``
evaluates the latest checkpoint in DIR and prints (and saves) the metrics.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from vlm_jax import checkpoint, config as config_lib, parallel
from vlm_jax.data import pipeline, tokenizers
from vlm_jax.models import towers

# --------------------------------------------------------------------------- metrics (pure NumPy)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Fraction of rows whose label is among the k highest scores."""
    order = np.argsort(-scores, axis=1, kind="stable")
    rank = np.argmax(order == labels[:, None], axis=1)
    return {f"top{k}": float(np.mean(rank < k)) for k in ks}


def recall_at_k(sim: np.ndarray, positives: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """sim: (Q, N) scores; positives: (Q, N) bool. Recall@K = fraction of
    queries with at least one positive among their K best-scored items."""
    order = np.argsort(-sim, axis=1, kind="stable")
    hits = np.take_along_axis(positives, order, axis=1)
    first = np.where(hits.any(axis=1), np.argmax(hits, axis=1), sim.shape[1])
    return {k: float(np.mean(first < k)) for k in ks}


def retrieval_metrics(zimg: np.ndarray, ztxt: np.ndarray, captions: Sequence[str]) -> dict[str, float]:
    captions = np.asarray(captions)
    same = captions[:, None] == captions[None, :]  # (images, texts): caption j is a positive of image i
    sim = zimg @ ztxt.T
    out = {f"i2t_r{k}": v for k, v in recall_at_k(sim, same).items()}
    out.update({f"t2i_r{k}": v for k, v in recall_at_k(sim.T, same.T).items()})
    return out


def class_embeddings(encode_text: Callable[[np.ndarray], np.ndarray], tok: tokenizers.Tokenizer, text_len: int,
                     class_names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    prompts = [t.format(name) for name in class_names for t in templates]
    z = encode_text(tokenizers.tokenize(tok, prompts, text_len)).reshape(len(class_names), len(templates), -1)
    z = z.mean(axis=1)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


# --------------------------------------------------------------------------- embedding on the mesh


def make_encoders(model: towers.TwoTower, params, mesh: Mesh, batch_size: int):
    """Returns (encode_image, encode_text): host arrays in, host embeddings out.

    Inputs are padded to a multiple of the (device-rounded) batch size so that
    each shape compiles once; every process holds all inputs and all outputs.
    """
    n = parallel.num_data_devices(mesh)
    bs = -(-batch_size // n) * n
    in_sh, out_sh = parallel.batch_sharding(mesh), parallel.replicated(mesh)

    img_fn = jax.jit(
        lambda p, x: model.apply({"params": p}, pipeline.normalize_images(x), method=towers.TwoTower.encode_image),
        out_shardings=out_sh,
    )
    txt_fn = jax.jit(
        lambda p, x: model.apply({"params": p}, x, method=towers.TwoTower.encode_text), out_shardings=out_sh
    )

    def run(fn, x: np.ndarray) -> np.ndarray:
        outs = []
        for start in range(0, len(x), bs):
            chunk = x[start:start + bs]
            pad = bs - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            arr = jax.make_array_from_callback(chunk.shape, in_sh, lambda idx, c=chunk: c[idx])
            outs.append(np.asarray(fn(params, arr))[: bs - pad])
        return np.concatenate(outs).astype(np.float32)

    return (lambda x: run(img_fn, x)), (lambda x: run(txt_fn, x))


def evaluate_splits(model, params, mesh: Mesh, eval_data: Mapping[str, dict], ds: pipeline.Dataset,
                    config) -> dict[str, float]:
    """Zero-shot and retrieval metrics for every loaded split, namespaced by split."""
    if not eval_data:
        return {}
    encode_image, encode_text = make_encoders(model, params, mesh, config.evaluate.batch_size)
    text_len = config.model.text.max_len
    metrics: dict[str, float] = {}
    zcls = None
    if ds.class_names:
        zcls = class_embeddings(encode_text, ds.tokenizer, text_len, ds.class_names, config.evaluate.templates)
    for split, data in eval_data.items():
        zimg = encode_image(data["image"])
        ztxt = encode_text(data["text"])
        for k, v in retrieval_metrics(zimg, ztxt, data["caption"]).items():
            metrics[f"retrieval/{split}/{k}"] = v
        if zcls is not None and "label" in data:
            keep = data.get("zeroshot_mask", np.ones(len(zimg), bool))
            if keep.any():
                acc = topk_accuracy(zimg[keep] @ zcls.T, data["label"][keep], ks=(1, 5))
                for k, v in acc.items():
                    metrics[f"zeroshot/{split}/{k}"] = v
    return metrics


def load_eval_data(ds: pipeline.Dataset, config) -> dict[str, dict]:
    return {
        split: pipeline.load_split(ds, config.data, split, config.model.text.max_len, config.evaluate.max_examples)
        for split in config.evaluate.splits
    }


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    from vlm_jax import train  # the trainer owns state construction and restore

    args = train.parse_args(argv, prog="python -m vlm_jax.evaluate")
    train.initialize_distributed(args)
    config = train.load_config_or_exit(args)
    try:
        run = train.setup(config)
        mgr = checkpoint.manager(args.workdir, config.train.keep_checkpoints)
        step = mgr.latest_step()
        if step is None:
            raise config_lib.ConfigError(f"--workdir {args.workdir} holds no checkpoint to evaluate")
        train.check_workdir(mgr, step, config, run.abstract, args.workdir)
    except config_lib.ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    state, _ = checkpoint.restore(mgr, step, train.with_shardings(run.abstract, run.state_sh))
    metrics = evaluate_splits(run.model, state["params"], run.mesh, load_eval_data(run.ds, config), run.ds, config)
    if jax.process_index() == 0:
        with open(os.path.join(args.workdir, f"eval_step{step}.json"), "w") as f:
            json.dump({"step": step, **metrics}, f, indent=1)
        for k in sorted(metrics):
            print(f"{k:40s} {metrics[k]:.4f}")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
