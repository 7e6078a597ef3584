"""Curate a dataset with a trained model: heuristic filters, near-duplicates and CLIP-score.

    python -m vlm_jax.curate --config configs/default.py --workdir RUN --out curated/NAME.json \
        [--step N] [--split train] [--keep_fraction 0.7 | --min_score S] [--min_words 2] \
        [--max_repeat 0.5] [--min_side 0] [--max_aspect 0] [--dedup 0] [--chunk 2048] [--config.a.b=value ...]

``--config`` and ``--workdir`` name the scoring model (the run's own config);
the data curated is the config's (``--dataset`` / ``--dataset_config``: other
data, read with the model's tokenizer). Every example of the
split is scored by the model's own pair similarity (pooled models: the
cosine of its image and caption embeddings, the CLIP-score), batched over
the devices, ``--chunk`` examples at a time; scores are saved after every
chunk beside ``--out``, so a killed run continues where it stopped.

Then, in this order, an example is dropped with the first reason that holds:
  * ``short_caption``: fewer than ``--min_words`` words;
  * ``repetitive_caption``: more than ``--max_repeat`` of its words repeat an
    earlier word (0 = off);
  * ``small_image`` / ``extreme_aspect``: the stored image's shorter side is
    below ``--min_side``, or its aspect ratio (long / short) above
    ``--max_aspect`` (0 = off);
  * ``near_duplicate``: its image embedding has cosine ≥ ``--dedup`` with a
    kept example's of higher score (0 = off);
  * ``low_clip_score``: below ``--min_score``, or outside the best
    ``--keep_fraction`` of what is left;
  * ``group_cap``: with ``--balance label|cluster``, outside the best
    ``--per_group`` of its class (``config.data.label_key``) or of its
    k-means cluster of image embeddings (``--clusters``; spherical k-means,
    seeded by ``config.seed``). With ``--oversample`` the ids of smaller
    groups repeat, best first, up to ``--per_group``: each group then
    contributes equally to every epoch.

``--weight_floor F`` adds per-pair loss weights, one per kept id: the
rank of its score among the kept examples mapped linearly to [F, 1] (the
lowest kept score gets F, the highest 1; tied scores share the lower rank,
and an id repeated by ``--oversample`` has its one weight); CLIP's and SigLIP's losses use
them with ``--config.data.index_weights=True``.

The index (JSON) names the dataset, split and checkpoint, and holds every
example's score and drop reason and the kept ids; training reads it with
``--config.data.index_file=PATH`` (``pipeline.train_dataset``), without
copying data, and resumes exactly as on the full split. When the split has
a boolean ``swapped`` feature (the embedded ``noisy30`` configs), the index
also reports how well the scores rank clean pairs above swapped ones (AUROC)
and which fraction of each the filters kept.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from typing import Any, Sequence

import jax
import numpy as np

from vlm_jax import session
from vlm_jax.data import pipeline
from vlm_jax.errors import ConfigError, cli_errors

FORMAT = "vlm_jax.curated_index/1"
REASONS = ("short_caption", "repetitive_caption", "small_image", "extreme_aspect", "near_duplicate",
           "low_clip_score", "group_cap")


def _flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="the index to write (JSON)")
    p.add_argument("--step", type=int, default=-1, help="checkpoint of --workdir to score with (default: the latest)")
    p.add_argument("--split", default="", help="split to curate (default: config.data.train_split)")
    p.add_argument("--dataset", default="", help="curate this prepared dataset instead of config.data's (read "
                   "with the model's tokenizer)")
    p.add_argument("--dataset_config", default="", help="its config (with --dataset, or config.data.dataset's)")
    p.add_argument("--keep_fraction", type=float, default=1.0, help="keep the best fraction by score of what is left")
    p.add_argument("--min_score", type=float, default=None, help="drop pairs scoring below this instead")
    p.add_argument("--min_words", type=int, default=1)
    p.add_argument("--max_repeat", type=float, default=0.0, help="max fraction of repeated words (0 = off)")
    p.add_argument("--min_side", type=int, default=0, help="min shorter image side in pixels (0 = off)")
    p.add_argument("--max_aspect", type=float, default=0.0, help="max long/short side ratio (0 = off)")
    p.add_argument("--dedup", type=float, default=0.0, help="image-embedding cosine at which a pair is a near-duplicate (0 = off)")
    p.add_argument("--chunk", type=int, default=2048, help="examples scored between two saves")
    p.add_argument("--balance", choices=("", "label", "cluster"), default="",
                   help="balance the kept examples over config.data.label_key's classes or over k-means clusters "
                        "of the image embeddings")
    p.add_argument("--clusters", type=int, default=16, help="k of the k-means clusters (--balance cluster)")
    p.add_argument("--per_group", type=int, default=0,
                   help="keep at most this many of each group, the best by score (0 = the median group's size)")
    p.add_argument("--oversample", action="store_true",
                   help="repeat the examples of smaller groups (best first) up to --per_group")
    p.add_argument("--weight_floor", type=float, default=None,
                   help="write per-pair loss weights, the kept examples' score ranks mapped to [F, 1] (training "
                        "reads them with --config.data.index_weights=True)")


def auroc(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counting one half."""
    pos, neg = np.asarray(positive_scores, np.float64), np.asarray(negative_scores, np.float64)
    if not len(pos) or not len(neg):
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = np.argsort(allv, kind="stable")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    # average ranks over ties (1-based)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_v)) + 1]
    ends = np.r_[starts[1:], len(allv)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def repeated_fraction(caption: str) -> float:
    words = caption.lower().split()
    return 0.0 if not words else 1.0 - len(set(words)) / len(words)


def _image_size(value) -> tuple[int, int]:
    """(height, width) of a stored image without decoding its pixels."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        from PIL import Image

        w, h = Image.open(io.BytesIO(bytes(value))).size
        return h, w
    return tuple(np.shape(value)[:2])


def _partial_path(out: str) -> str:
    return out + ".partial.npz"


def score_split(run, config, data, data_cfg, params, split: str, chunk: int, out: str,
                want_embeddings: bool) -> dict[str, Any]:
    """Scores (and, for dedup, image embeddings) of every example of ``data``
    (an opened dataset), resumable chunk by chunk."""
    source = data.sources[split]
    n = len(source)
    embedder = run.objective.embedder()
    from vlm_jax.evaluators.base import MeshEncoder

    encoder = MeshEncoder(embedder, run.mesh, min(chunk, 256))
    path = _partial_path(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    state: dict[str, Any] = {"scores": np.full(n, np.nan, np.float32), "done": 0, "emb": None}
    if os.path.exists(path):
        with np.load(path) as f:
            lacks_emb = want_embeddings and "emb" not in f.files and int(f["done"]) > 0  # saved by a run that kept none
            if lacks_emb:
                print(f"{path}: scored without image embeddings, which --dedup / --balance cluster need; "
                      f"scoring {split} again from the start", flush=True)
            elif len(f["scores"]) == n:
                state = {"scores": f["scores"].copy(), "done": int(f["done"]),
                         "emb": f["emb"].copy() if "emb" in f.files else None}
    from tqdm import tqdm

    bar = tqdm(total=n, initial=state["done"], desc=f"scoring {split}", unit="ex", disable=jax.process_index() != 0)
    text_len = config.model.text.max_len
    while state["done"] < n:
        start = state["done"]
        part = pipeline.load_split(data, data_cfg, split, text_len, chunk, field="--split", start=start)
        img, txt = encoder.images(params, part["image"]), encoder.texts(params, part["text"])
        stop = start + len(part["image"])
        state["scores"][start:stop] = embedder.pair_scores(img, txt)
        if want_embeddings:
            if np.ndim(img) != 2:
                raise ConfigError("--dedup / --balance cluster: this objective's image representation is not one "
                                  "vector per image; use --balance label or no --dedup")
            if state["emb"] is None:
                state["emb"] = np.zeros((n, img.shape[1]), np.float32)
            state["emb"][start:stop] = img / np.maximum(np.linalg.norm(img, axis=1, keepdims=True), 1e-12)
        state["done"] = stop
        if jax.process_index() == 0:
            extra = {"emb": state["emb"]} if state["emb"] is not None else {}
            tmp = path + ".tmp.npz"
            np.savez(tmp, scores=state["scores"], done=stop, **extra)
            os.replace(tmp, path)  # a kill leaves the previous save or this one, never half of one
        bar.update(stop - start)
    bar.close()
    return state


def near_duplicates(emb: np.ndarray, order: np.ndarray, threshold: float, block: int = 1024) -> np.ndarray:
    """Boolean (n,): examples (taken in ``order``, best first) whose embedding
    has cosine ≥ threshold with an earlier kept one."""
    dup = np.zeros(len(emb), bool)
    kept: list[int] = []
    for s in range(0, len(order), block):
        ids = order[s:s + block]
        sims_prev = emb[ids] @ emb[kept].T if kept else np.zeros((len(ids), 0), np.float32)
        within = emb[ids] @ emb[ids].T
        for k, i in enumerate(ids):
            earlier = [j for j in range(k) if not dup[ids[j]]]
            if (sims_prev[k] >= threshold).any() or (within[k, earlier] >= threshold).any():
                dup[i] = True
        kept.extend(int(i) for i in ids if not dup[i])
    return dup


def spherical_kmeans(emb: np.ndarray, k: int, seed: int, iterations: int = 20) -> np.ndarray:
    """(n,) cluster ids of unit vectors: k-means++ seeding by ``seed``, then
    ``iterations`` rounds of assigning by cosine and re-normalising the means."""
    rng = np.random.default_rng(seed)
    centres = [emb[int(rng.integers(len(emb)))]]
    for _ in range(1, k):
        dist = np.clip(1.0 - np.max(emb @ np.stack(centres).T, axis=1), 0.0, None)
        total = dist.sum()
        centres.append(emb[int(rng.choice(len(emb), p=dist / total))] if total > 0 else emb[int(rng.integers(len(emb)))])
    c = np.stack(centres)
    for _ in range(iterations):
        assign = np.argmax(emb @ c.T, axis=1)
        for j in range(k):
            members = emb[assign == j]
            if len(members):
                m = members.sum(axis=0)
                c[j] = m / max(np.linalg.norm(m), 1e-12)
    return np.argmax(emb @ c.T, axis=1)


def balance(groups: np.ndarray, kept: np.ndarray, scores: np.ndarray, per_group: int,
            oversample: bool) -> tuple[np.ndarray, np.ndarray]:
    """(ids to train on, ids capped out): at most ``per_group`` of each
    group's kept ids, the best by score; with ``oversample`` a smaller
    group's ids repeat, best first, up to ``per_group``."""
    out, capped = [], []
    for g in np.unique(groups[kept]):
        members = kept[groups[kept] == g]
        members = members[np.argsort(-scores[members], kind="stable")]
        capped.extend(members[per_group:].tolist())
        take = members[:per_group]
        if oversample and len(take) < per_group:
            take = np.resize(take, per_group)  # cycles through the group, best first
        out.extend(take.tolist())
    return np.sort(np.asarray(out, np.int64)), np.asarray(capped, np.int64)


def rank_weights(scores: np.ndarray, floor: float) -> np.ndarray:
    """Score ranks mapped linearly to [floor, 1]: the lowest score gets
    ``floor``, the highest 1, tied scores the lower rank."""
    if len(scores) < 2:
        return np.ones(len(scores), np.float32)
    rank = np.searchsorted(np.sort(scores), scores, side="left")
    return (floor + (1.0 - floor) * rank / (len(scores) - 1)).astype(np.float32)


def curate(args: argparse.Namespace, config) -> dict[str, Any]:
    run = session.setup(config)
    data_cfg, data = config.data, run.ds
    if args.dataset or args.dataset_config:
        data_cfg = config.data.copy_and_resolve_references()
        with data_cfg.unlocked():
            data_cfg.dataset = args.dataset or data_cfg.dataset
            data_cfg.dataset_config = args.dataset_config if args.dataset_config or args.dataset else data_cfg.dataset_config
        try:
            data = pipeline.open_dataset(data_cfg, tokenizer=run.ds.tokenizer)
        except ValueError as e:
            raise ConfigError(f"--dataset: {e}") from e
    split = args.split or config.data.train_split
    if split not in data.sources:
        raise ConfigError(f"--split: {split!r} not in the dataset (splits: {sorted(data.sources)})")
    if not 0.0 < args.keep_fraction <= 1.0:
        raise ConfigError(f"--keep_fraction: must be in (0, 1], got {args.keep_fraction}")
    if args.weight_floor is not None and not 0.0 <= args.weight_floor <= 1.0:
        raise ConfigError(f"--weight_floor: must be in [0, 1], got {args.weight_floor}")
    if args.balance == "label" and not data.class_names_of(data_cfg.label_key):
        raise ConfigError(f"--balance label: the dataset has no class-label feature {data_cfg.label_key!r} "
                          f"(config.data.label_key); use --balance cluster")
    if args.balance == "cluster" and args.clusters < 2:
        raise ConfigError(f"--clusters: must be at least 2, got {args.clusters}")
    if args.per_group < 0:
        raise ConfigError(f"--per_group: must be 0 (the median group's size) or positive, got {args.per_group}")
    step, params = session.restore_params(config, run, args.workdir, args.step)
    need_emb = args.dedup > 0 or args.balance == "cluster"
    state = score_split(run, config, data, data_cfg, params, split, args.chunk, args.out, need_emb)
    source = data.sources[split]
    n = len(source)
    reason = np.asarray([""] * n, dtype=object)
    swapped = np.zeros(n, bool) if "swapped" in data.features else None
    labels = np.zeros(n, np.int64)
    for i in range(n):
        row = source[i]
        if args.balance == "label":
            labels[i] = int(row[data_cfg.label_key])
            if labels[i] < 0:
                raise ConfigError(f"--balance label: example {i} of {split!r} has no class ({data_cfg.label_key} "
                                  f"= {labels[i]}); balance by --balance cluster, or curate labelled data")
        caption = pipeline.first_caption(row, data_cfg)
        h, w = _image_size(row[data_cfg.image_key])
        if swapped is not None:
            swapped[i] = bool(row["swapped"])
        if len(caption.split()) < args.min_words:
            reason[i] = "short_caption"
        elif args.max_repeat and repeated_fraction(caption) > args.max_repeat:
            reason[i] = "repetitive_caption"
        elif args.min_side and min(h, w) < args.min_side:
            reason[i] = "small_image"
        elif args.max_aspect and max(h, w) / max(min(h, w), 1) > args.max_aspect:
            reason[i] = "extreme_aspect"
    scores = state["scores"]
    order = np.argsort(-scores, kind="stable")
    if args.dedup > 0:
        alive = order[reason[order] == ""]
        dup = near_duplicates(state["emb"], alive, args.dedup)
        reason[dup & (reason == "")] = "near_duplicate"
    alive = order[reason[order] == ""]
    if args.min_score is not None:
        low = alive[scores[alive] < args.min_score]
    else:
        low = alive[int(round(args.keep_fraction * len(alive))):]
    reason[low] = "low_clip_score"
    kept = np.flatnonzero(reason == "")
    groups = None
    if args.balance and len(kept):
        groups = labels if args.balance == "label" else spherical_kmeans(state["emb"], args.clusters, config.seed)
        sizes = np.bincount(groups[kept])
        per_group = args.per_group or int(np.median(sizes[sizes > 0]))
        kept, capped = balance(groups, kept, scores, per_group, args.oversample)
        reason[capped] = "group_cap"
    index = {
        "format": FORMAT, "dataset": data_cfg.dataset, "dataset_config": data_cfg.dataset_config,
        "split": split, "num_examples": n, "checkpoint": {"workdir": os.path.abspath(args.workdir), "step": step},
        "rules": {k: getattr(args, k) for k in ("keep_fraction", "min_score", "min_words", "max_repeat", "min_side",
                                                "max_aspect", "dedup", "balance", "clusters", "per_group",
                                                "oversample", "weight_floor")},
        "dropped": {r: int((reason == r).sum()) for r in REASONS},
        "kept": kept.tolist(), "scores": [float(s) for s in scores], "drop_reason": reason.tolist(),
    }
    if groups is not None:
        index["groups"] = {"of_example": groups.tolist(), "kept_per_group": np.bincount(
            groups[kept], minlength=int(groups.max()) + 1).tolist()}
    if args.weight_floor is not None:
        ids = np.unique(kept)  # ranks among distinct examples: an oversampled id weighs as its one copy
        index["weights"] = rank_weights(scores[ids], args.weight_floor)[np.searchsorted(ids, kept)].tolist()
    if swapped is not None:
        index["swapped"] = {"auroc_clean_over_swapped": auroc(scores[~swapped], scores[swapped]),
                            "kept_clean": float(np.mean(reason[~swapped] == "")) if (~swapped).any() else None,
                            "kept_swapped": float(np.mean(reason[swapped] == "")) if swapped.any() else None,
                            "num_swapped": int(swapped.sum())}
    return index


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = session.parse_args(argv, prog="python -m vlm_jax.curate", description=__doc__.split("\n\n")[0],
                              extra=_flags)
    session.initialize_distributed(args)
    config = session.load_config_or_exit(args)
    with cli_errors():
        index = curate(args, config)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(index, f)
            os.replace(tmp, args.out)
        except OSError as e:
            raise SystemExit(f"error: could not write --out {args.out} ({e.strerror})") from None
        if os.path.exists(_partial_path(args.out)):
            os.remove(_partial_path(args.out))
        print(f"kept {len(index['kept'])} of {index['num_examples']}; dropped {index['dropped']}")
        if "swapped" in index:
            print(f"swapped pairs: {index['swapped']}")
    return index


if __name__ == "__main__":
    main(sys.argv[1:])
