"""Linear probe and few-shot transfer on frozen image features.

Features: the image tower's pooled output before the projection
(``Embedder.features``), for the first ``train_examples`` of ``train_split``
and the first ``max_examples`` of each evaluated split (those whose
``filter_key`` feature is true, if one is named), standardised with the
training features' mean and standard deviation.

Classifier: multinomial logistic regression, mean cross-entropy plus
``l2 / 2 · ||W||²`` (bias not penalised), fitted full-batch by L-BFGS
(``optax.lbfgs`` with its zoom line search) for ``steps`` iterations, jitted
once per run: every fit pads its examples to one shape and weights the
padding zero.

* ``linear_probe``: ``l2`` is chosen from ``l2_grid`` by top-1 accuracy on a
  held-out ``val_fraction`` of the training examples (a fixed permutation;
  ties go to the larger l2), then the probe is refitted on all of them.
  Metrics: top1, mean_per_class_recall and the chosen l2; per-class top-1 to
  the results file.
* ``fewshot``: for each k in ``shots`` and each of ``seeds`` seeds, k training
  examples per class (drawn by (seed, k), all of a class's if it has fewer)
  fit a probe with ``l2 = fewshot_l2``. Metrics: ``<k>shot_top1``, the mean
  over seeds.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlm_jax.errors import ConfigError, require
from vlm_jax.evaluators.base import Evaluator, Metrics
from vlm_jax.evaluators.zeroshot import classification_metrics


def _objective(params, x, y, w, l2):
    weights, bias = params
    logits = x @ weights + bias
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(w * ce) / jnp.sum(w) + 0.5 * l2 * jnp.sum(weights * weights)


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def fit_logistic(x: jax.Array, y: jax.Array, w: jax.Array, l2: jax.Array, *, num_classes: int,
                 steps: int) -> tuple[jax.Array, jax.Array]:
    """(weights (d, C), bias (C,)) minimising the weighted mean cross-entropy
    of ``x`` (n, d) against ``y`` (n,) plus l2/2·||weights||²."""
    loss = functools.partial(_objective, x=x, y=y, w=w, l2=l2)
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry, _):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss)
        return (optax.apply_updates(params, updates), state), None

    init = (jnp.zeros((x.shape[1], num_classes), jnp.float32), jnp.zeros((num_classes,), jnp.float32))
    (params, _), _ = jax.lax.scan(step, (init, opt.init(init)), length=steps)
    return params


class Probe:
    """Fits on padded training sets of one shape (one compilation per run)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, num_classes: int, steps: int, pad_to: int):
        self.mean, self.std = x.mean(axis=0), x.std() + 1e-6
        self.x, self.y = self.standardise(x), y.astype(np.int32)
        self.num_classes, self.steps, self.pad_to = num_classes, steps, pad_to

    def standardise(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std).astype(np.float32)

    def fit(self, rows: np.ndarray, l2: float) -> tuple[np.ndarray, np.ndarray]:
        n = len(rows)
        idx = np.concatenate([rows, np.zeros(self.pad_to - n, rows.dtype)])
        w = np.concatenate([np.ones(n, np.float32), np.zeros(self.pad_to - n, np.float32)])
        weights, bias = fit_logistic(self.x[idx], self.y[idx], w, jnp.float32(l2), num_classes=self.num_classes,
                                     steps=self.steps)
        return np.asarray(weights), np.asarray(bias)

    def scores(self, params: tuple[np.ndarray, np.ndarray], x: np.ndarray, standardised: bool = False) -> np.ndarray:
        weights, bias = params
        return (x if standardised else self.standardise(x)) @ weights + bias


def shot_rows(labels: np.ndarray, num_classes: int, k: int, seed: int) -> np.ndarray:
    """Sorted rows of k examples per class (all of a class's if it has
    fewer), drawn by (seed, k): the few-shot training set."""
    rng = np.random.default_rng([seed, k])
    members = [np.flatnonzero(labels == c) for c in range(num_classes)]
    return np.sort(np.concatenate([rng.permutation(m)[:k] for m in members if len(m)]))


class LabelledSplits:
    """Mixin for evaluators that fit on labelled training examples: the
    first ``train_examples`` of ``train_split`` and the first ``max_examples``
    of each evaluated split, with their ``label_key`` labels (only the
    examples whose ``filter_key`` feature is true, if one is named)."""

    TRAIN_FIELDS: ClassVar[dict[str, Any]] = {
        "train_split": "train",
        "train_examples": 10_000,  # the first N examples of train_split
    }

    @staticmethod
    def check_train_fields(entry, field: str) -> None:
        require(entry.train_examples > 1, f"{field}.train_examples", "must be at least 2")

    def check_labelled(self) -> None:
        """Every split read has the label (and filter) feature (setup time)."""
        for split in (self.entry.train_split, *self.entry.splits):
            data = self.labelled_split(split)
            for key in filter(None, (self.label_key, self.entry.filter_key)):
                if key not in data:
                    raise ConfigError(f"config.{self.field}: split {split!r} has no feature {key!r}")

    def split_size(self, split: str) -> int:
        return self.entry.train_examples if split == self.entry.train_split else self.entry.max_examples

    def labelled_split(self, split: str) -> dict[str, np.ndarray]:
        return self.ctx.split(self.data_cfg, split, self.split_size(split), f"config.{self.field}.train_split")

    def kept(self, split: str) -> np.ndarray:
        """(n,) bool: the examples of ``split`` this evaluator uses."""
        data = self.labelled_split(split)
        return data[self.entry.filter_key].astype(bool) if self.entry.filter_key else np.ones(len(data["image"]), bool)

    def labels(self, split: str) -> np.ndarray:
        """(kept examples,) int32 labels of ``split``."""
        return self.labelled_split(split)[self.label_key][self.kept(split)].astype(np.int32)

    def labelled(self, params, split: str, kind: str = "features") -> tuple[np.ndarray, np.ndarray]:
        """(representations, labels) of the kept examples; ``kind``
        "features" (the probes' frozen features) or "images" (the embedder's
        image representations), memoised within one suite pass."""
        data = self.labelled_split(split)
        n = self.split_size(split)
        key = (kind, self.data_cfg.dataset, self.data_cfg.dataset_config, self.data_cfg.data_dir,
               self.data_cfg.image_key, split, n, self.encoder.batch)
        encode = self.encoder.features if kind == "features" else self.encoder.images
        reps = self.ctx.encoded(key, lambda: encode(params, data["image"]))
        return np.asarray(reps, np.float32)[self.kept(split)], self.labels(split)


class _ProbeEvaluator(LabelledSplits, Evaluator):
    """What the linear probe and few-shot share: labelled features of the
    training split and of each evaluated split."""

    FIELDS: ClassVar[dict[str, Any]] = {
        "label_key": "",  # ClassLabel feature; "" = config.data.label_key
        "filter_key": "",  # bool feature selecting the examples; "" = all
        **LabelledSplits.TRAIN_FIELDS,
        "steps": 100,  # L-BFGS iterations per fit
    }

    @classmethod
    def check(cls, entry, field: str) -> None:
        super().check(entry, field)
        cls.check_train_fields(entry, field)
        require(entry.steps > 0, f"{field}.steps", "must be positive")

    def setup(self) -> None:
        self.label_key = self.entry.label_key or self.ctx.config.data.label_key
        ds = self.ctx.dataset(self.data_cfg)
        self.class_names = ds.class_names_of(self.label_key) if self.label_key else None
        if not self.class_names:
            raise ConfigError(f"config.{self.field}.label_key: dataset {self.data_cfg.dataset!r} has no class-label "
                              f"feature {self.label_key!r} (features: {sorted(ds.features)})")
        self.check_labelled()

    def labelled_features(self, params, split: str) -> tuple[np.ndarray, np.ndarray]:
        return self.labelled(params, split, "features")


class LinearProbe(_ProbeEvaluator):
    FIELDS: ClassVar[dict[str, Any]] = {
        **_ProbeEvaluator.FIELDS,
        "l2_grid": (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0),
        "val_fraction": 0.2,  # of the training examples, held out to choose l2
    }
    namespace = "linear_probe"

    @classmethod
    def check(cls, entry, field: str) -> None:
        super().check(entry, field)
        require(len(entry.l2_grid) > 0 and all(v >= 0 for v in entry.l2_grid), f"{field}.l2_grid",
                "must hold one or more values >= 0")
        require(0 < entry.val_fraction < 1, f"{field}.val_fraction", "must be in (0, 1)")

    def evaluate_split(self, params, split: str) -> Metrics:
        fitted = self.ctx.encoded(("linear_probe", self.name), lambda: self._fit(params))
        probe, weights, l2 = fitted
        x, y = self.labelled_features(params, split)
        if not len(x):
            return {}
        metrics, per_class = classification_metrics(probe.scores(weights, x), y, self.class_names)
        self.details[split] = {"per_class_top1": per_class, "l2": l2}
        return {**metrics, "l2": l2}

    def _fit(self, params):
        x, y = self.labelled_features(params, self.entry.train_split)
        if len(x) < 2:
            raise ConfigError(f"config.{self.field}: fewer than 2 training examples in {self.entry.train_split!r}")
        probe = Probe(x, y, len(self.class_names), self.entry.steps, pad_to=len(x))
        order = np.random.default_rng(0).permutation(len(x))
        n_val = min(len(x) - 1, max(1, int(round(self.entry.val_fraction * len(x)))))
        val, fit = order[:n_val], order[n_val:]
        best, best_acc = None, -1.0
        for l2 in sorted(self.entry.l2_grid):
            weights = probe.fit(fit, l2)
            acc = float(np.mean(np.argmax(probe.scores(weights, probe.x[val], standardised=True), axis=1) == y[val]))
            if acc >= best_acc:  # ties: the larger l2
                best, best_acc = l2, acc
        return probe, probe.fit(np.arange(len(x)), best), float(best)


class FewShot(_ProbeEvaluator):
    FIELDS: ClassVar[dict[str, Any]] = {
        **_ProbeEvaluator.FIELDS,
        "shots": (1, 2, 4, 8, 16),
        "seeds": 3,
        "fewshot_l2": 1e-2,
    }
    namespace = "fewshot"

    @classmethod
    def check(cls, entry, field: str) -> None:
        super().check(entry, field)
        require(len(entry.shots) > 0 and all(k > 0 for k in entry.shots), f"{field}.shots",
                "must hold one or more positive counts")
        require(entry.seeds > 0, f"{field}.seeds", "must be positive")
        require(entry.fewshot_l2 >= 0, f"{field}.fewshot_l2", "must be >= 0")

    def evaluate_split(self, params, split: str) -> Metrics:
        fits = self.ctx.encoded(("fewshot", self.name), lambda: self._fit(params))
        x, y = self.labelled_features(params, split)
        if not len(x):
            return {}
        out = {}
        for k, (probe, per_seed) in fits.items():
            accs = [np.mean(np.argmax(probe.scores(w, x), axis=1) == y) for w in per_seed]
            out[f"{k}shot_top1"] = float(np.mean(accs))
        return out

    def _fit(self, params) -> dict[int, tuple[Probe, list]]:
        x, y = self.labelled_features(params, self.entry.train_split)
        num_classes = len(self.class_names)
        pad_to = max(self.entry.shots) * num_classes
        probe = Probe(x, y, num_classes, self.entry.steps, pad_to=pad_to)
        fits = {}
        for k in sorted(self.entry.shots):
            per_seed = [probe.fit(shot_rows(y, num_classes, k, seed), self.entry.fewshot_l2)
                        for seed in range(self.entry.seeds)]
            fits[k] = (probe, per_seed)
        return fits
