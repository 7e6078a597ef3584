"""Input pipeline: TFDS array_record data source -> grain -> per-process batches.

The train stream is a pure function of (seed, position): grain shuffles by
index with a per-epoch seed, so the iterator's whole state is a small JSON dict
that the checkpoint stores, and a resumed run sees exactly the batches the
uninterrupted run would have seen. Each process decodes only its own slice of every
global batch (``global_batch / process_count`` examples), and the global order
does not depend on the number of processes; the train loop assembles the global
array with ``jax.make_array_from_process_local_data``.

Images stay uint8 until they reach the device (a quarter of the bytes to copy);
``normalize_images`` runs inside the jitted step.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import grain
import numpy as np
from PIL import Image

from vlm_jax.data import shapes_tfds, tokenizers

EMBEDDED = shapes_tfds.NAME


@dataclasses.dataclass
class Dataset:
    """Opened data: one random-access source per split, the tokenizer, class names."""

    sources: dict[str, Any]
    tokenizer: tokenizers.Tokenizer
    class_names: list[str] | None


def open_dataset(data_cfg) -> Dataset:
    """Opens (and for the embedded dataset, generates once) the configured data.

    Raises a ValueError naming ``config.data.*`` for a missing dataset, split or
    tokenizer, before anything is compiled.
    """
    data_dir = os.path.expanduser(data_cfg.data_dir)
    tok_path = data_cfg.tokenizer_path
    if data_cfg.dataset == EMBEDDED:
        builder = shapes_tfds.prepare(data_dir, data_cfg.dataset_config or "default", data_cfg.vocab_size)
        if data_cfg.tokenizer == "sentencepiece" and not tok_path:
            tok_path = shapes_tfds.tokenizer_path(data_dir, data_cfg.dataset_config or "default")
    else:
        import tensorflow_datasets as tfds

        name = data_cfg.dataset + (f"/{data_cfg.dataset_config}" if data_cfg.dataset_config else "")
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except Exception as e:  # tfds raises several types for unknown names
            raise ValueError(f"config.data.dataset: TFDS dataset {name!r} is unknown ({e})") from e
        if not builder.is_prepared():
            raise ValueError(
                f"config.data.dataset: TFDS dataset {name!r} is not prepared in config.data.data_dir="
                f"{data_dir!r}; prepare it there first (this library never downloads)"
            )
    if data_cfg.tokenizer == "sentencepiece" and tok_path and not os.path.isfile(os.path.expanduser(tok_path)):
        raise ValueError(f"config.data.tokenizer_path: no SentencePiece model at {tok_path!r}")
    tok = tokenizers.make_tokenizer(data_cfg.tokenizer, tok_path and os.path.expanduser(tok_path))
    sources = builder.as_data_source()
    for key in (data_cfg.image_key, data_cfg.text_key):
        if key not in builder.info.features:
            raise ValueError(
                f"config.data: feature {key!r} not in dataset {data_cfg.dataset!r} "
                f"(features: {sorted(builder.info.features)})"
            )
    features = builder.info.features
    label = features[data_cfg.label_key] if data_cfg.label_key and data_cfg.label_key in features else None
    class_names = list(label.names) if label is not None and hasattr(label, "names") else None
    return Dataset(dict(sources), tok, class_names)


def _split(ds: Dataset, name: str, field: str):
    if name not in ds.sources:
        raise ValueError(f"{field}: split {name!r} not in the dataset (splits: {sorted(ds.sources)})")
    return ds.sources[name]


def resize_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes an HxWx3 uint8 image to size x size (block mean when it divides)."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    if h == w and h % size == 0:
        f = h // size
        pooled = image.reshape(size, f, size, f, 3).astype(np.float32).mean(axis=(1, 3))
        return np.round(pooled).astype(np.uint8)
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def normalize_images(images):
    """uint8 [0, 255] -> float32 [-1, 1]; runs on device inside the step."""
    return images.astype("float32") * (2.0 / 255.0) - 1.0


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class _Preprocess(grain.transforms.Map):
    def __init__(self, data_cfg, tok: tokenizers.Tokenizer, text_len: int, with_label: bool = False):
        self._cfg = data_cfg
        self._tok = tok
        self._len = text_len
        self._with_label = with_label

    def map(self, ex):
        image = resize_uint8(np.asarray(ex[self._cfg.image_key]), self._cfg.image_size)
        tokens = tokenizers.tokenize(self._tok, [_text(ex[self._cfg.text_key])], self._len)[0]
        out = {"image": image, "text": tokens}
        if self._with_label:
            out["label"] = np.int32(ex[self._cfg.label_key])
        return out


def augment_view(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random view for image–image contrast: a shift of up to 1/8 of the
    side (edge padding) and a horizontal flip with probability ½."""
    size = image.shape[0]
    pad = max(size // 8, 1)
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    dy, dx = rng.integers(0, 2 * pad + 1, size=2)
    view = padded[dy:dy + size, dx:dx + size]
    return view[:, ::-1] if rng.random() < 0.5 else view


class _TwoViews(grain.transforms.RandomMap):
    def random_map(self, ex, rng: np.random.Generator):
        return {**ex, "view1": augment_view(ex["image"], rng), "view2": augment_view(ex["image"], rng)}


def train_dataset(ds: Dataset, data_cfg, text_len: int, global_batch: int, seed: int,
                  process_index: int = 0, process_count: int = 1, *, with_label: bool = False,
                  two_views: bool = False) -> grain.IterDataset:
    """Infinite stream of this process's share of each global batch.

    Batches hold "image" (uint8) and "text" (int32 tokens); with ``with_label``
    also "label" (config.data.label_key, for UniCL); with ``two_views`` also
    "view1" and "view2", two random augmentations of the image (for SLIP),
    drawn from a per-example generator seeded by (seed, position), so they too
    are reproduced exactly after a resume."""
    if global_batch % process_count:
        raise ValueError(f"config.train.batch_size={global_batch} is not divisible by {process_count} processes")
    source = _split(ds, data_cfg.train_split, "config.data.train_split")
    if len(source) < global_batch:
        raise ValueError(f"config.train.batch_size={global_batch}: the train split has only {len(source)} examples")
    if with_label and not ds.class_names:
        raise ValueError(f"config.data.label_key={data_cfg.label_key!r} names no class-label feature of the dataset")
    local_batch = global_batch // process_count
    # One global order for every process count: global batch g is rows
    # [g·B, (g+1)·B) of the shuffled stream and process p takes the p-th
    # slice of it. Random access means only those rows are ever decoded here.
    stream = (
        grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
        .map(_Preprocess(data_cfg, ds.tokenizer, text_len, with_label))
    )
    if two_views:
        stream = stream.random_map(_TwoViews(), seed=seed + 1)
    return (
        stream.batch(local_batch, drop_remainder=True)[process_index::process_count]
        .to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.num_threads, prefetch_buffer_size=data_cfg.prefetch))
    )


def load_split(ds: Dataset, data_cfg, split: str, text_len: int, max_examples: int) -> dict[str, np.ndarray]:
    """Loads the first ``max_examples`` of an evaluation split into memory."""
    source = _split(ds, split, "config.evaluate.splits")
    n = min(len(source), max_examples)
    prep = _Preprocess(data_cfg, ds.tokenizer, text_len)
    rows = [source[i] for i in range(n)]
    processed = [prep.map(r) for r in rows]
    out = {
        "image": np.stack([p["image"] for p in processed]),
        "text": np.stack([p["text"] for p in processed]),
        "caption": np.asarray([_text(r[data_cfg.text_key]) for r in rows]),
    }
    if data_cfg.label_key and data_cfg.label_key in rows[0]:
        out["label"] = np.asarray([int(r[data_cfg.label_key]) for r in rows], dtype=np.int32)
    if data_cfg.zeroshot_filter_key and data_cfg.zeroshot_filter_key in rows[0]:
        out["zeroshot_mask"] = np.asarray([bool(r[data_cfg.zeroshot_filter_key]) for r in rows])
    return out
