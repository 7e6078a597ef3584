"""What every evaluator shares: the embedder protocol, the mesh encoder that
compiles once per run, the run-wide context with its caches, and the
``Evaluator`` base class.

An evaluator is one entry of ``config.evals``: a kind (the class), its own
dataset and splits, its own frequency. ``due(step)`` says whether it runs at a
step and ``run(params)`` returns its metrics, namespaced
``<kind>/<split>/<metric>`` (prefixed by the entry's name when two entries
of one kind evaluate the same split of the same data).

How a model is scored (pooled embeddings and cosine similarity, or FILIP's
token-wise similarity) is not the evaluator's business: the objective hands
an ``Embedder`` to the context, and every evaluator asks it.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from typing import Any, Callable, ClassVar, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from vlm_jax import parallel
from vlm_jax.data import pipeline, tokenizers
from vlm_jax.errors import ConfigError, require, unknown_field

Metrics = dict[str, float]

# Fields every entry of config.evals has, with their defaults ("" or 0: take
# the training data's value, see ``data_config``).
COMMON_FIELDS: dict[str, Any] = {
    "kind": "",
    "every": 0,  # steps between evaluations during training; 0 = config.train.eval_every
    "dataset": "",  # "" = the training dataset (config.data); else a prepared TFDS name
    "dataset_config": "",
    "data_dir": "",
    "splits": (),  # no splits: the entry is off
    "image_key": "",
    "text_key": "",
    "max_examples": 1000,  # the first N examples of each split
    "batch_size": 256,  # per encoder call, rounded up to a multiple of the data devices
}


# --------------------------------------------------------------------------- embedders


class Embedder(abc.ABC):
    """How a model is scored: per-example image and text representations
    (pytrees of arrays with a leading example axis, computed under jit on the
    mesh) and the similarity between them (on the host)."""

    @abc.abstractmethod
    def images(self, params, images: jax.Array) -> Any:
        """uint8 images (n, H, W, 3) -> representations (traced under jit)."""

    @abc.abstractmethod
    def texts(self, params, tokens: jax.Array) -> Any:
        """int32 tokens (n, L) -> representations (traced under jit)."""

    @abc.abstractmethod
    def scores(self, img: Any, txt: Any) -> tuple[np.ndarray, np.ndarray]:
        """(image→text scores (n_img, n_txt), text→image scores (n_txt, n_img))."""

    @abc.abstractmethod
    def class_scores(self, img: Any, prompts: Any, num_classes: int, num_templates: int) -> np.ndarray:
        """(n_img, num_classes) zero-shot scores; ``prompts`` holds the text
        representations of every (class, template) prompt, class-major."""

    def features(self, params, images: jax.Array) -> jax.Array:
        """uint8 images -> (n, d) frozen features for probes (traced under
        jit); by default the image representation itself."""
        return self.images(params, images)

    def pair_scores(self, img: Any, txt: Any, block: int = 256) -> np.ndarray:
        """(n,) score of image i with text i, computed block by block."""
        n = len(jax.tree_util.tree_leaves(img)[0])
        out = []
        for s in range(0, n, block):
            cut = lambda x, s=s: x[s:s + block]  # noqa: E731
            i2t, _ = self.scores(jax.tree_util.tree_map(cut, img), jax.tree_util.tree_map(cut, txt))
            out.append(np.diagonal(i2t))
        return np.concatenate(out) if out else np.zeros((0,), np.float32)


class DenseEmbedder(abc.ABC):
    """What a model whose image tokens live in the text embedding space adds
    to its embedder (dense zero-shot: segmentation, box classification)."""

    @abc.abstractmethod
    def patches(self, params, images: jax.Array) -> jax.Array:
        """uint8 images (n, H, W, 3) -> (n, g², d) patch tokens in the space
        of ``texts`` (row-major g × g grid; traced under jit)."""


class TransferEmbedder(abc.ABC):
    """What a model scored by the cosine of one L2-normalised embedding per
    image and per text adds for transfer (adapters, prompt tuning): its
    ``images`` are (n, d) embeddings, and a class is one (d,) embedding."""

    # Widths of the learned prompt vectors the towers take, or None where a
    # tower takes none (a ResNet takes no visual prompt tokens; a one-tower
    # model's rendered texts take no text prompt).
    text_prompt_width: int | None = None
    image_prompt_width: int | None = None

    @abc.abstractmethod
    def class_embeddings(self, prompts: np.ndarray, num_classes: int, num_templates: int) -> np.ndarray:
        """(num_classes, d) unit class embeddings from the (class, template)
        prompt embeddings, class-major (the ones ``class_scores`` compares)."""

    def token_vectors(self, params, tokens: jax.Array) -> jax.Array:
        """(..., text width) input embeddings of token ids (prompt tuning's
        initial context); traced under jit."""
        raise NotImplementedError

    def prompted_texts(self, params, tokens: jax.Array, where: jax.Array, vectors: jax.Array) -> jax.Array:
        """(n, d) text embeddings with ``vectors`` (n, L, width) in place of the
        token embeddings at ``where`` (n, L); traced under jit."""
        raise NotImplementedError

    def prompted_images(self, params, images: jax.Array, prompts: jax.Array) -> jax.Array:
        """(n, d) embeddings of uint8 images with prompt tokens (P, width) in
        the image tower; traced under jit."""
        raise NotImplementedError


class Captioner(abc.ABC):
    """What a model with a caption decoder adds to its embedder (CoCa): it
    writes captions and scores given ones (both traced under jit)."""

    @abc.abstractmethod
    def captions(self, params, images: jax.Array, eos_id: int, beams: int, length_penalty: float) -> jax.Array:
        """uint8 images (n, H, W, 3) -> caption tokens (n, L), 0-padded after EOS."""

    @abc.abstractmethod
    def caption_logprob(self, params, images: jax.Array, tokens: jax.Array) -> jax.Array:
        """(n_img, n_txt): log p(caption j | image i), summed over its real tokens."""


class MeshEncoder:
    """Host arrays in, host representations out, batched over the data devices.

    The two encoders are jitted once, with the parameters as an argument, and
    every call pads to one batch shape: a run compiles each exactly once."""

    def __init__(self, embedder: Embedder, mesh: Mesh, batch_size: int):
        n = parallel.num_data_devices(mesh)
        self.batch = -(-batch_size // n) * n
        self._in_sh = parallel.batch_sharding(mesh)
        self._out_sh = parallel.replicated(mesh)
        self._images = self.compile(embedder.images)
        self._texts = self.compile(embedder.texts)
        self._features = self.compile(embedder.features)  # compiled when a probe first asks

    def compile(self, fn: Callable) -> Callable:
        """``fn(params, x, *rest)`` jitted with replicated outputs, for ``run``."""
        return jax.jit(fn, out_shardings=self._out_sh)

    def run(self, fn: Callable, params, x: np.ndarray, *rest, dtype=np.float32) -> Any:
        """``fn(params, chunk, *rest)`` over ``x`` in padded batches split over
        the data devices; the outputs concatenated on the host as ``dtype``."""
        outs = []
        bs = self.batch
        for start in range(0, len(x), bs):
            chunk = x[start:start + bs]
            pad = bs - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            arr = jax.make_array_from_callback(chunk.shape, self._in_sh, lambda idx, c=chunk: c[idx])
            outs.append(jax.tree_util.tree_map(lambda y, p=pad: np.asarray(y)[: bs - p], fn(params, arr, *rest)))
        return jax.tree_util.tree_map(lambda *ys: np.concatenate(ys).astype(dtype), *outs)

    def images(self, params, images: np.ndarray) -> Any:
        return self.run(self._images, params, images)

    def texts(self, params, tokens: np.ndarray) -> Any:
        return self.run(self._texts, params, tokens)

    def features(self, params, images: np.ndarray) -> np.ndarray:
        return self.run(self._features, params, images)


# --------------------------------------------------------------------------- the run-wide context


def data_config(config, entry):
    """The data config an entry reads: config.data with the entry's own
    dataset, config, directory and feature keys where it names them."""
    d = config.data.copy_and_resolve_references()
    with d.unlocked():
        for field in ("dataset", "dataset_config", "data_dir", "image_key", "text_key"):
            if entry[field]:
                d[field] = entry[field]
        if entry.dataset and not entry.dataset_config:
            d.dataset_config = ""
    return d


@contextlib.contextmanager
def _as_config_error():
    """Data errors (missing dataset, split, feature) are config mistakes."""
    try:
        yield
    except (ValueError, FileNotFoundError, KeyError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e).strip("'\"")) from e


@dataclasses.dataclass
class Context:
    """What every evaluator of a run is built from, and the caches they share:
    opened datasets, loaded splits, one encoder per batch size and, during one
    ``Suite.run``, the representations of each split (zero-shot and retrieval
    on the same split encode its images once)."""

    config: Any
    mesh: Mesh
    embedder: Embedder
    train_data: pipeline.Dataset
    _datasets: dict = dataclasses.field(default_factory=dict)
    _splits: dict = dataclasses.field(default_factory=dict)
    _encoders: dict = dataclasses.field(default_factory=dict)
    _memo: dict | None = None

    @property
    def tokenizer(self) -> tokenizers.Tokenizer:
        return self.train_data.tokenizer  # the model's own, whatever the evaluation data

    @property
    def text_len(self) -> int:
        return self.config.model.text.max_len

    def dataset(self, data_cfg) -> pipeline.Dataset:
        key = (data_cfg.dataset, data_cfg.dataset_config, data_cfg.data_dir)
        if key == (self.config.data.dataset, self.config.data.dataset_config, self.config.data.data_dir):
            return self.train_data
        if key not in self._datasets:
            with _as_config_error():
                self._datasets[key] = pipeline.open_dataset(data_cfg, tokenizer=self.tokenizer)
        return self._datasets[key]

    def split(self, data_cfg, split: str, max_examples: int, field: str) -> dict[str, np.ndarray]:
        key = (data_cfg.dataset, data_cfg.dataset_config, data_cfg.data_dir, data_cfg.image_key,
               data_cfg.text_key, split, max_examples)
        if key not in self._splits:
            ds = self.dataset(data_cfg)
            with _as_config_error():
                self._splits[key] = pipeline.load_split(ds, data_cfg, split, self.text_len, max_examples, field=field)
        return self._splits[key]

    def encoder(self, batch_size: int) -> MeshEncoder:
        if batch_size not in self._encoders:
            self._encoders[batch_size] = MeshEncoder(self.embedder, self.mesh, batch_size)
        return self._encoders[batch_size]

    @contextlib.contextmanager
    def one_pass(self):
        """Within this block the parameters do not change: representations are memoised."""
        self._memo = {}
        try:
            yield
        finally:
            self._memo = None

    def encoded(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """Memoised within one ``Suite.run`` (same parameters), else computed."""
        if self._memo is None:
            return compute()
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]


# --------------------------------------------------------------------------- evaluators


class Evaluator(abc.ABC):
    """One entry of config.evals. Subclasses set ``FIELDS`` (their own entry
    fields with defaults), ``namespace`` (the first part of their metric keys)
    and implement ``evaluate_split``."""

    FIELDS: ClassVar[dict[str, Any]] = {}
    namespace: ClassVar[str] = ""

    def __init__(self, name: str, entry, ctx: Context, prefix: str = ""):
        self.name, self.entry, self.ctx, self.prefix = name, entry, ctx, prefix
        self.details: dict[str, Any] = {}  # split -> what the results file keeps beyond the metrics
        self.every = entry.every or ctx.config.train.eval_every
        self.field = f"evals.{name}"
        self.data_cfg = data_config(ctx.config, entry)
        self.encoder = ctx.encoder(entry.batch_size)
        for split in entry.splits:  # a missing dataset, split or feature fails before training starts
            ctx.split(self.data_cfg, split, entry.max_examples, f"config.{self.field}.splits")
        self.setup()

    @classmethod
    def check(cls, entry, field: str) -> None:
        """Device-independent checks of the entry's own fields (config time)."""
        require(entry.max_examples > 0, f"{field}.max_examples", "must be positive")
        require(entry.batch_size > 0, f"{field}.batch_size", "must be positive")
        require(entry.every >= 0, f"{field}.every", "must be 0 (config.train.eval_every) or positive")

    def setup(self) -> None:
        """Work done once per run (class names, prompt tokens)."""

    def due(self, step: int, total: int) -> bool:
        """Every ``every`` steps and at the last one; never with every = 0
        (an entry that inherits ``config.train.eval_every = 0``)."""
        return bool(self.entry.splits) and self.every > 0 and (step % self.every == 0 or step == total)

    def data(self, split: str) -> dict[str, np.ndarray]:
        return self.ctx.split(self.data_cfg, split, self.entry.max_examples, f"config.{self.field}.splits")

    def encode_images(self, params, split: str) -> Any:
        key = ("images", self.data_cfg.dataset, self.data_cfg.dataset_config, self.data_cfg.data_dir,
               self.data_cfg.image_key, split, self.entry.max_examples, self.encoder.batch)
        return self.ctx.encoded(key, lambda: self.encoder.images(params, self.data(split)["image"]))

    def run(self, params) -> Metrics:
        self.details = {}
        out: Metrics = {}
        for split in self.entry.splits:
            for k, v in self.evaluate_split(params, split).items():
                out[f"{self.prefix}{self.namespace}/{split}/{k}"] = v
        return out

    @abc.abstractmethod
    def evaluate_split(self, params, split: str) -> Metrics:
        """Metrics of one split, keyed by metric name (top1, i2t_r1, ...)."""


def check_entry_fields(entry, fields: Mapping[str, Any], field: str) -> None:
    for key in entry.keys():
        if key not in fields:
            raise unknown_field(f"config.{field}.{key}", key, fields)
