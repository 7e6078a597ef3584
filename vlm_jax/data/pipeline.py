"""Input pipeline: TFDS array_record data source -> grain -> per-process batches.

The train stream is a pure function of (seed, position): grain shuffles by
index with a per-epoch seed, so the iterator's whole state is a small JSON dict
that the checkpoint stores, and a resumed run sees exactly the batches the
uninterrupted run would have seen. Each process decodes only its own slice of every
global batch (``global_batch / process_count`` examples), and the global order
does not depend on the number of processes; the train loop assembles the global
array with ``jax.make_array_from_process_local_data``.

Images are decoded here (``images.decode_rgb``: any mode to RGB), cropped
(``images.train_view`` / ``eval_view``) and stay uint8 until they reach the
device (a quarter of the bytes to copy); ``normalize_images`` runs inside the
jitted step. Every random choice (crop window, flip, which of an image's
captions) draws from a generator seeded by (seed, position in the stream), so
a resumed run, or a run with more processes or decoding workers, sees the
same examples. ``config.data.workers`` > 0 decodes in that many processes.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import grain
import numpy as np

from vlm_jax.data import images, shapes_tfds, tokenizers

# Datasets this library generates itself, once, into config.data.data_dir
# (nothing is downloaded): name -> a module with ``prepare(data_dir,
# config_name, vocab_size) -> TFDS builder`` and ``tokenizer_path(data_dir,
# config_name, vocab_size)`` (the SentencePiece model it fits beside the data).
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
            tok_path = generator.tokenizer_path(data_dir, data_cfg.dataset_config or "default", data_cfg.vocab_size)
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
                f"{data_dir!r}; prepare it there first, or ingest your files with python -m vlm_jax.data.ingest "
                f"(this library never downloads)"
            )
        fitted = os.path.join(data_dir, data_cfg.dataset, "tokenizer.model")  # ingest --fit_tokenizer
        if data_cfg.tokenizer == "sentencepiece" and not tok_path and os.path.isfile(fitted):
            tok_path = fitted
    if tokenizer is None:
        if tok_path and not os.path.isfile(os.path.expanduser(tok_path)):
            raise ValueError(f"config.data.tokenizer_path: no {data_cfg.tokenizer} file at {tok_path!r}")
        tokenizer = tokenizers.make_tokenizer(data_cfg.tokenizer, tok_path and os.path.expanduser(tok_path))
    features = builder.info.features
    for key in (data_cfg.image_key, data_cfg.text_key):
        if key not in features:
            raise ValueError(
                f"config.data: feature {key!r} not in dataset {data_cfg.dataset!r} "
                f"(features: {sorted(features)})"
            )
    # Every encoded image feature reaches us as bytes: the image is decoded by
    # our decoder (every mode handled alike), any other image feature (the
    # embedded data's instance "mask") only where it is read, so that the train
    # stream does not decode a mask per example it never looks at.
    import tensorflow_datasets as tfds

    decoders = {key: tfds.decode.SkipDecoding() for key, feature in features.items()
                if isinstance(feature, tfds.features.Image)} or None
    sources = builder.as_data_source(decoders=decoders)
    ds = Dataset(dict(sources), tokenizer, None, builder.info.features)
    ds.class_names = ds.class_names_of(data_cfg.label_key) if data_cfg.label_key else None
    return ds


def _split(ds: Dataset, name: str, field: str):
    if name not in ds.sources:
        raise ValueError(f"{field}: split {name!r} not in the dataset (splits: {sorted(ds.sources)})")
    return ds.sources[name]


def normalize_images(images):
    """uint8 [0, 255] -> float32 [-1, 1]; runs on device inside the step."""
    return images.astype("float32") * (2.0 / 255.0) - 1.0


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# Example fields an objective may ask for beyond "image" and "text": the
# field's name -> the config.data field naming the dataset feature it reads.
# "regions" reads the grounding features ``objects`` ({bbox, label}) and
# ``phrases`` ({start, end, objects}: a character span of the caption and a
# bit mask of the objects it names), as the embedded dataset has them.
# "negative_text" is a hard-negative caption (``swap_word`` with the word
# groups of config.data.negative_words; all padding when no word can swap).
EXAMPLE_FIELDS = {"label": "label_key", "regions": "", "weight": "", "negative_text": ""}
PAIR_WEIGHT = "_pair_weight"  # what an IndexedSource with weights adds to each example

# Region and phrase keys (``regions``): a class label >= 0, or one of these.
BACKGROUND = -1  # the background phrase (the last phrase slot)
ABSENT = -2  # an empty slot, or a box mostly cropped away


def regions(ex, caption: str, view: images.View, tok: tokenizers.Tokenizer, text_len: int,
            data_cfg) -> dict[str, np.ndarray]:
    """The grounding of one example in fixed shapes, in the view's frame:

    * "boxes" (max_boxes, 4) float32: (y_min, x_min, y_max, x_max) in [0, 1];
    * "box_labels" (max_boxes,) int32: each box's class, ABSENT where there is
      no box or less than ``data.box_min_visible`` of it is in the view;
    * "phrases" (max_phrases + 1, text_len) int32: the tokens of the caption's
      phrases, then of ``data.background_phrase``;
    * "phrase_labels" (max_phrases + 1,) int32: the class of the first object
      each phrase names, BACKGROUND for the last, ABSENT for empty slots.

    ``caption`` must be the caption the phrases' spans refer to."""
    nb, npr = data_cfg.max_boxes, data_cfg.max_phrases
    objects, phrases = ex["objects"], ex["phrases"]
    labels = np.asarray(objects["label"], np.int32).reshape(-1)
    if len(labels) > nb or len(phrases["start"]) > npr:
        raise ValueError(f"config.data.max_boxes={nb} / max_phrases={npr}: an example has {len(labels)} objects "
                         f"and {len(phrases['start'])} phrases; raise them")
    boxes, visible = images.view_boxes(np.asarray(objects["bbox"], np.float32).reshape(-1, 4), view)
    out_boxes = np.zeros((nb, 4), np.float32)
    out_boxes[: len(boxes)] = boxes
    box_labels = np.full((nb,), ABSENT, np.int32)
    box_labels[: len(labels)] = np.where(visible >= data_cfg.box_min_visible, labels, ABSENT)
    texts, phrase_labels = [], np.full((npr + 1,), ABSENT, np.int32)
    for k, (start, end, named) in enumerate(zip(phrases["start"], phrases["end"], phrases["objects"])):
        texts.append(caption[int(start):int(end)])
        first = (int(named) & -int(named)).bit_length() - 1  # the lowest set bit
        phrase_labels[k] = labels[first] if first >= 0 else ABSENT
    phrase_labels[npr] = BACKGROUND
    tokens = np.zeros((npr + 1, text_len), np.int32)
    tokens[: len(texts)] = tokenizers.tokenize(tok, texts, text_len) if texts else tokens[:0]
    tokens[npr] = tokenizers.tokenize(tok, [data_cfg.background_phrase], text_len)[0]
    return {"boxes": out_boxes, "box_labels": box_labels, "phrases": tokens, "phrase_labels": phrase_labels}


def swap_word(caption: str, groups: Sequence[Sequence[str]], rng: np.random.Generator) -> str | None:
    """A hard-negative caption: one word of ``caption`` that belongs to one
    of ``groups`` (interchangeable words of one kind: colours, shapes,
    counts), chosen uniformly among such words, replaced by another word of
    its group, chosen uniformly. None when no word is in a group (then
    nothing is drawn). Words are split at single spaces and compared as
    they are, so the rest of the caption is kept character for character."""
    words = caption.split(" ")
    group_of = {w: g for g in groups for w in g}
    at = [i for i, w in enumerate(words) if w in group_of]
    if not at:
        return None
    i = at[int(rng.integers(len(at)))]
    others = [w for w in group_of[words[i]] if w != words[i]]
    words[i] = others[int(rng.integers(len(others)))]
    return " ".join(words)


def check_word_groups(groups, field: str = "config.data.negative_words") -> None:
    """Raises a ValueError naming ``field`` unless ``groups`` is a non-empty
    sequence of groups of at least two distinct single words, no word in two
    groups."""
    if not groups or isinstance(groups, str):
        raise ValueError(f"{field}: give groups of interchangeable words, e.g. "
                         f"(('red', 'green', 'blue'), ('circle', 'square')); got {groups!r}")
    seen: dict[str, int] = {}
    for k, group in enumerate(groups):
        words = [group] if isinstance(group, str) else list(group)
        if len(set(words)) < 2 or any(not isinstance(w, str) or not w or " " in w for w in words):
            raise ValueError(f"{field}: group {k} {tuple(words)!r} must hold at least two distinct words without "
                             f"spaces")
        for w in words:
            if w in seen and seen[w] != k:
                raise ValueError(f"{field}: {w!r} is in groups {seen[w]} and {k}; a word may be in one group only")
            seen[w] = k


def first_caption(ex, data_cfg) -> str:
    """An example's first caption, as text."""
    return _text(_captions(ex[data_cfg.text_key])[0])


def _captions(value) -> list:
    """A caption feature's value as a list: one Text, or a Sequence of them."""
    if isinstance(value, (bytes, str)):
        return [value]
    return list(value)


class _Preprocess(grain.transforms.RandomMap):
    """Decode, crop and tokenize one example: the training view (random
    window, flip, one of its captions at random) or, with ``train=False``,
    the evaluation view (centre crop, first caption)."""

    def __init__(self, data_cfg, tok: tokenizers.Tokenizer, text_len: int, fields: Sequence[str] = (),
                 train: bool = True):
        self._cfg = data_cfg
        self._tok = tok
        self._len = text_len
        self._fields = tuple(fields)
        self._train = train

    def random_map(self, ex, rng: np.random.Generator):
        cfg = self._cfg
        captions = _captions(ex[cfg.text_key])
        dense = "regions" in self._fields  # boxes must follow the crop: keep its geometry
        if self._train:
            image = images.train_view(ex[cfg.image_key], cfg.image_size, rng, cfg.crop_area, cfg.crop_ratio,
                                      cfg.flip, cfg.resample, geometry=dense)
            image, view = image if dense else (image, None)
            caption = captions[int(rng.integers(len(captions)))] if len(captions) > 1 else captions[0]
        else:
            decoded = images.decode_rgb(ex[cfg.image_key])
            image = images.eval_view(decoded, cfg.image_size, cfg.resample)
            view = images.eval_geometry(*decoded.shape[:2])
            caption = captions[0]
        out = {"image": image, "text": tokenizers.tokenize(self._tok, [_text(caption)], self._len)[0]}
        for field in self._fields:
            if field == "regions":
                out.update(regions(ex, _text(caption), view, self._tok, self._len, cfg))
            elif field == "weight":  # the curated index's per-pair loss weight
                out[field] = np.float32(ex[PAIR_WEIGHT])
            elif field == "negative_text":  # drawn after every other choice: the views stay as without it
                negative = swap_word(_text(caption), cfg.negative_words, rng)
                out[field] = (np.full((self._len,), tokenizers.PAD_ID, np.int32) if negative is None
                              else tokenizers.tokenize(self._tok, [negative], self._len)[0])
            else:
                out[field] = np.int32(ex[cfg[EXAMPLE_FIELDS[field]]])
        return out


class _Augment(grain.transforms.RandomMap):
    """Applies an objective's per-example ``augment(example, rng)``."""

    def __init__(self, fn: Callable[[dict, np.random.Generator], dict]):
        self._fn = fn

    def random_map(self, ex, rng: np.random.Generator):
        return self._fn(ex, rng)


class IndexedSource:
    """The examples of a source that a curated index keeps, in index order
    (``python -m vlm_jax.curate``; an id may repeat, as balanced sampling
    writes it): random access like the source itself. With ``weights`` (one
    per entry of ``kept``), each example carries its pair weight."""

    def __init__(self, source, kept: Sequence[int], weights: Sequence[float] | None = None):
        self._source, self._kept = source, np.asarray(kept, np.int64)
        self._weights = None if weights is None else np.asarray(weights, np.float32)

    def __len__(self) -> int:
        return len(self._kept)

    def __getitem__(self, i):
        ex = self._source[int(self._kept[i])]
        return ex if self._weights is None else {**ex, PAIR_WEIGHT: self._weights[i]}


def _nbytes(value) -> int:
    """Approximate memory of a decoded example's leaves (arrays, bytes, scalars)."""
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (bytes, bytearray, str)):
        return len(value) + 64
    if isinstance(value, np.ndarray):
        return value.nbytes + 128
    return 32


class CachedSource:
    """``source`` with every example it returns kept in memory, until the
    kept examples take ``max_bytes`` (later ones are then read each time):
    after the first epoch a small dataset skips record reads and TFDS's
    feature parsing, most of what an example costs the host. A pure
    optimisation: each read returns what the source returns (a new dict
    every time, sharing the cached values, which the pipeline never
    modifies), so batches are unchanged bit for bit. Each worker process
    (``config.data.workers``) keeps its own cache."""

    def __init__(self, source, max_bytes: int):
        self._source, self._budget = source, int(max_bytes)
        self._cache: dict[int, dict] = {}
        self.cached_bytes = 0

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i):
        i = int(i)
        ex = self._cache.get(i)
        if ex is None:
            ex = self._source[i]
            size = _nbytes(ex)
            if self.cached_bytes + size <= self._budget:
                self._cache[i] = ex  # two threads may both read i first; either copy is the same
                self.cached_bytes += size
        return dict(ex)


def file_digest(path: str) -> str:
    """SHA-256 of a file's bytes (hex)."""
    import hashlib

    h = hashlib.sha256()
    with open(os.path.expanduser(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def indexed_source(source, data_cfg, split: str):
    """``source`` restricted to ``config.data.index_file``'s kept examples
    (unchanged without one); the index must name this dataset and split."""
    path = data_cfg.index_file
    if not path:
        return source
    import json

    try:
        with open(os.path.expanduser(path)) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"config.data.index_file: cannot read {path!r} ({e}); write it with python -m vlm_jax.curate")
    if not isinstance(index, dict) or index.get("format") != "vlm_jax.curated_index/1":
        raise ValueError(f"config.data.index_file: {path!r} is not a curated index (python -m vlm_jax.curate)")
    want = (data_cfg.dataset, data_cfg.dataset_config, split, len(source))
    got = (index["dataset"], index["dataset_config"], index["split"], index["num_examples"])
    if want != got:
        raise ValueError(f"config.data.index_file: {path!r} indexes {got[0]}/{got[1]} split {got[2]!r} of {got[3]} "
                         f"examples, but training reads {want[0]}/{want[1]} split {want[2]!r} of {want[3]}")
    kept = index["kept"]
    if not kept or min(kept) < 0 or max(kept) >= len(source):
        raise ValueError(f"config.data.index_file: {path!r} keeps no example, or ids outside the split")
    weights = None
    if data_cfg.index_weights:
        weights = index.get("weights")
        if weights is None:
            raise ValueError(f"config.data.index_weights: {path!r} holds no pair weights; write them with "
                             f"python -m vlm_jax.curate --weight_floor F, or set index_weights=False")
        if len(weights) != len(kept) or min(weights) < 0:
            raise ValueError(f"config.data.index_file: {path!r} has {len(weights)} weights for {len(kept)} kept "
                             f"ids, or a negative weight; write it again with python -m vlm_jax.curate")
    return IndexedSource(source, kept, weights)


def check_fields(ds: Dataset, data_cfg, fields: Sequence[str]) -> None:
    """Raises a ValueError naming the config field unless the dataset has
    what the example ``fields`` read (the session runs this before anything
    is compiled; ``train_dataset`` again)."""
    unknown = [f for f in fields if f not in EXAMPLE_FIELDS]
    if unknown:
        raise ValueError(f"example fields {unknown} are unknown to the pipeline (known: {sorted(EXAMPLE_FIELDS)})")
    if "label" in fields and not ds.class_names:
        raise ValueError(f"config.data.label_key={data_cfg.label_key!r} names no class-label feature of the dataset")
    if "regions" in fields:
        check_grounding(ds, data_cfg)
    if "negative_text" in fields:
        check_word_groups(data_cfg.negative_words)
    if "weight" in fields and not (data_cfg.index_file and data_cfg.index_weights):
        raise ValueError("config.data.index_weights: per-pair weights come from a curated index; set "
                         "config.data.index_file (python -m vlm_jax.curate --weight_floor F) and index_weights=True")


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
    source = indexed_source(_split(ds, data_cfg.train_split, "config.data.train_split"), data_cfg,
                            data_cfg.train_split)
    if data_cfg.cache_mib:
        source = CachedSource(source, data_cfg.cache_mib << 20)
    if len(source) < global_batch:
        raise ValueError(f"config.train.batch_size={global_batch}: the train split has only {len(source)} examples"
                         + (" in config.data.index_file" if data_cfg.index_file else ""))
    check_fields(ds, data_cfg, fields)
    local_batch = global_batch // process_count
    # One global order for every process count: global batch g is rows
    # [g·B, (g+1)·B) of the shuffled stream and process p takes the p-th
    # slice of it. Random access means only those rows are ever decoded here.
    stream = (
        grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
        .random_map(_Preprocess(data_cfg, ds.tokenizer, text_len, fields), seed=seed + 2)
    )
    if augment is not None:
        stream = stream.random_map(_Augment(augment), seed=seed + 1)
    batches = (
        stream.batch(local_batch, drop_remainder=True)[process_index::process_count]
        .to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.num_threads, prefetch_buffer_size=data_cfg.prefetch))
    )
    if data_cfg.workers:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; our CLIs use argparse
            flags.FLAGS.mark_as_parsed()
        # Worker w decodes batches w, w + W, ...; grain interleaves them back in
        # order, and the iterator state (a checkpoint's data record) covers them.
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.workers))
    return batches


def check_grounding(ds: Dataset, data_cfg) -> None:
    """Raises a ValueError naming the dataset unless it has the grounding
    features ``regions`` and ``load_dense`` read."""
    missing = [k for k in ("objects", "phrases") if ds.features is None or k not in ds.features]
    if missing:
        raise ValueError(f"config.data.dataset={data_cfg.dataset!r} has no grounding features {missing} (boxes "
                         f"with labels, phrase spans): region objectives need them, as vlm_shapes >= 2.0.0 has")


def load_dense(ds: Dataset, data_cfg, split: str, max_examples: int, field: str = "config.evals") -> dict:
    """Dense ground truth of the first ``max_examples`` of a split, in the
    evaluation crop's frame (aligned with ``load_split``'s images):
    "classes" (n, S, S) int32 per-pixel class (``BACKGROUND`` outside every
    object; from the instance "mask" feature and the objects' labels),
    "boxes" (n, max_boxes, 4) and "box_labels" (n, max_boxes) as ``regions``
    gives them (ABSENT for empty slots)."""
    check_grounding(ds, data_cfg)
    if "mask" not in ds.features:
        raise ValueError(f"{field}: dataset {data_cfg.dataset!r} has no instance 'mask' feature")
    source = _split(ds, split, field)
    n = min(len(source), max_examples)
    size, nb = data_cfg.image_size, data_cfg.max_boxes
    classes = np.zeros((n, size, size), np.int32)
    boxes = np.zeros((n, nb, 4), np.float32)
    box_labels = np.full((n, nb), ABSENT, np.int32)
    for i in range(n):
        ex = source[i]
        mask = images.decode_map(ex["mask"])
        view = images.eval_geometry(*mask.shape[:2])
        labels = np.asarray(ex["objects"]["label"], np.int32).reshape(-1)
        if len(labels) > nb:
            raise ValueError(f"config.data.max_boxes={nb}: example {i} of {split!r} has {len(labels)} objects")
        lut = np.concatenate([[BACKGROUND], labels]).astype(np.int32)
        classes[i] = lut[images.view_mask(mask, view, size)]
        b, visible = images.view_boxes(np.asarray(ex["objects"]["bbox"], np.float32).reshape(-1, 4), view)
        boxes[i, : len(b)] = b
        box_labels[i, : len(labels)] = np.where(visible > 0, labels, ABSENT)
    return {"classes": classes, "boxes": boxes, "box_labels": box_labels}


def load_split(ds: Dataset, data_cfg, split: str, text_len: int, max_examples: int,
               field: str = "config.evals", start: int = 0) -> dict[str, np.ndarray]:
    """The first ``max_examples`` of a split (from example ``start``) in memory: "image" (uint8,
    the evaluation crop), "text" (tokens of the first caption), "caption"
    (the first caption of each), every caption of every image ("captions_all"
    strings, "text_all" tokens, "caption_image" the index of each one's
    image: multi-caption retrieval) and every scalar feature of the dataset
    under its own name (labels, flags). ``field`` names the config field that
    chose the split, for the error."""
    source = _split(ds, split, field)
    n = max(0, min(len(source) - start, max_examples))
    prep = _Preprocess(data_cfg, ds.tokenizer, text_len, train=False)
    rows = [source[start + i] for i in range(n)]
    processed = [prep.random_map(r, None) for r in rows]
    captions = [[_text(c) for c in _captions(r[data_cfg.text_key])] for r in rows]
    flat = [c for cs in captions for c in cs]
    out = {
        "image": np.stack([p["image"] for p in processed]),
        "text": np.stack([p["text"] for p in processed]),
        "caption": np.asarray([cs[0] for cs in captions]),
        "captions_all": np.asarray(flat),
        "text_all": tokenizers.tokenize(ds.tokenizer, flat, text_len),
        "caption_image": np.repeat(np.arange(n, dtype=np.int32), [len(cs) for cs in captions]),
    }
    for key, value in rows[0].items():
        if key not in out and key not in (data_cfg.image_key, data_cfg.text_key) and np.ndim(value) == 0:
            out[key] = np.asarray([r[key] for r in rows])
    return out
