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
from typing import Any, Callable, Sequence

import grain
import numpy as np
from PIL import Image

from vlm_jax.data import shapes_tfds, tokenizers

# Datasets this library generates itself, once, into config.data.data_dir
# (nothing is downloaded): name -> a module with ``prepare(data_dir,
# config_name, vocab_size) -> TFDS builder`` and ``tokenizer_path(data_dir,
# config_name)`` (the SentencePiece model it fits beside the data).
GENERATED = {
    shapes_tfds.NAME: shapes_tfds,
}


@dataclasses.dataclass
class Dataset:
    """Opened data: one random-access source per split, the tokenizer, the
    features, and the class names of ``config.data.label_key`` (if a ClassLabel)."""

    sources: dict[str, Any]
    tokenizer: tokenizers.Tokenizer
    class_names: list[str] | None
    features: Any = None

    def class_names_of(self, key: str) -> list[str] | None:
        """Names of the ClassLabel feature ``key``, or None."""
        feature = self.features[key] if self.features is not None and key in self.features else None
        return list(feature.names) if feature is not None and hasattr(feature, "names") else None


def open_dataset(data_cfg, tokenizer: tokenizers.Tokenizer | None = None) -> Dataset:
    """Opens (and for the embedded dataset, generates once) the configured data.

    ``tokenizer``: use this one (an evaluation dataset is read with the
    model's tokenizer) instead of the one ``config.data`` names.
    Raises a ValueError naming ``config.data.*`` for a missing dataset, split or
    tokenizer, before anything is compiled.
    """
    data_dir = os.path.expanduser(data_cfg.data_dir)
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise ValueError(f"config.data.data_dir: {data_dir!r} is a file, not a directory")
    tok_path = data_cfg.tokenizer_path
    if data_cfg.dataset in GENERATED:
        generator = GENERATED[data_cfg.dataset]
        builder = generator.prepare(data_dir, data_cfg.dataset_config or "default", data_cfg.vocab_size)
        if data_cfg.tokenizer == "sentencepiece" and not tok_path:
            tok_path = generator.tokenizer_path(data_dir, data_cfg.dataset_config or "default")
    else:  # any TFDS dataset already prepared in data_dir
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
    if tokenizer is None:
        if data_cfg.tokenizer == "sentencepiece" and tok_path and not os.path.isfile(os.path.expanduser(tok_path)):
            raise ValueError(f"config.data.tokenizer_path: no SentencePiece model at {tok_path!r}")
        tokenizer = tokenizers.make_tokenizer(data_cfg.tokenizer, tok_path and os.path.expanduser(tok_path))
    sources = builder.as_data_source()
    for key in (data_cfg.image_key, data_cfg.text_key):
        if key not in builder.info.features:
            raise ValueError(
                f"config.data: feature {key!r} not in dataset {data_cfg.dataset!r} "
                f"(features: {sorted(builder.info.features)})"
            )
    ds = Dataset(dict(sources), tokenizer, None, builder.info.features)
    ds.class_names = ds.class_names_of(data_cfg.label_key) if data_cfg.label_key else None
    return ds


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


# Example fields an objective may ask for beyond "image" and "text": the
# field's name -> the config.data field naming the dataset feature it reads.
EXAMPLE_FIELDS = {"label": "label_key"}


class _Preprocess(grain.transforms.Map):
    def __init__(self, data_cfg, tok: tokenizers.Tokenizer, text_len: int, fields: Sequence[str] = ()):
        self._cfg = data_cfg
        self._tok = tok
        self._len = text_len
        self._fields = tuple(fields)

    def map(self, ex):
        image = resize_uint8(np.asarray(ex[self._cfg.image_key]), self._cfg.image_size)
        tokens = tokenizers.tokenize(self._tok, [_text(ex[self._cfg.text_key])], self._len)[0]
        out = {"image": image, "text": tokens}
        for field in self._fields:
            out[field] = np.int32(ex[self._cfg[EXAMPLE_FIELDS[field]]])
        return out


class _Augment(grain.transforms.RandomMap):
    """Applies an objective's per-example ``augment(example, rng)``."""

    def __init__(self, fn: Callable[[dict, np.random.Generator], dict]):
        self._fn = fn

    def random_map(self, ex, rng: np.random.Generator):
        return self._fn(ex, rng)


def train_dataset(ds: Dataset, data_cfg, text_len: int, global_batch: int, seed: int,
                  process_index: int = 0, process_count: int = 1, *, fields: Sequence[str] = (),
                  augment: Callable[[dict, np.random.Generator], dict] | None = None) -> grain.IterDataset:
    """Infinite stream of this process's share of each global batch.

    Batches hold "image" (uint8) and "text" (int32 tokens), plus each of
    ``fields`` (keys of EXAMPLE_FIELDS: "label" reads config.data.label_key)
    and whatever ``augment`` adds (an objective's augmented views or masks).
    ``augment`` draws from a per-example generator seeded by (seed, position),
    so its choices too are reproduced exactly after a resume."""
    if global_batch % process_count:
        raise ValueError(f"config.train.batch_size={global_batch} is not divisible by {process_count} processes")
    source = _split(ds, data_cfg.train_split, "config.data.train_split")
    if len(source) < global_batch:
        raise ValueError(f"config.train.batch_size={global_batch}: the train split has only {len(source)} examples")
    unknown = [f for f in fields if f not in EXAMPLE_FIELDS]
    if unknown:
        raise ValueError(f"example fields {unknown} are unknown to the pipeline (known: {sorted(EXAMPLE_FIELDS)})")
    if "label" in fields and not ds.class_names:
        raise ValueError(f"config.data.label_key={data_cfg.label_key!r} names no class-label feature of the dataset")
    local_batch = global_batch // process_count
    # One global order for every process count: global batch g is rows
    # [g·B, (g+1)·B) of the shuffled stream and process p takes the p-th
    # slice of it. Random access means only those rows are ever decoded here.
    stream = (
        grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
        .map(_Preprocess(data_cfg, ds.tokenizer, text_len, fields))
    )
    if augment is not None:
        stream = stream.random_map(_Augment(augment), seed=seed + 1)
    return (
        stream.batch(local_batch, drop_remainder=True)[process_index::process_count]
        .to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.num_threads, prefetch_buffer_size=data_cfg.prefetch))
    )


def load_split(ds: Dataset, data_cfg, split: str, text_len: int, max_examples: int,
               field: str = "config.evals") -> dict[str, np.ndarray]:
    """The first ``max_examples`` of a split in memory: "image" (uint8,
    resized), "text" (tokens), "caption" (strings) and every scalar feature
    of the dataset under its own name (labels, flags). ``field`` names the
    config field that chose the split, for the error."""
    source = _split(ds, split, field)
    n = min(len(source), max_examples)
    prep = _Preprocess(data_cfg, ds.tokenizer, text_len)
    rows = [source[i] for i in range(n)]
    processed = [prep.map(r) for r in rows]
    out = {
        "image": np.stack([p["image"] for p in processed]),
        "text": np.stack([p["text"] for p in processed]),
        "caption": np.asarray([_text(r[data_cfg.text_key]) for r in rows]),
    }
    for key, value in rows[0].items():
        if key not in out and key not in (data_cfg.image_key, data_cfg.text_key) and np.ndim(value) == 0:
            out[key] = np.asarray([r[key] for r in rows])
    return out
