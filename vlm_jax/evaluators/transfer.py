"""Few-shot transfer of a frozen two-tower: adapters and prompt tuning.

Each kind adapts the model to a labelled dataset from k training examples
per class (for each k in ``shots`` and each of ``seeds`` seeds, drawn as the
``fewshot`` evaluator draws them) and reports ``<k>shot_top1`` on every
evaluated split, the mean over seeds (each seed's accuracy goes to the
results file). The class names and templates are the ``zeroshot``
evaluator's fields, so an entry's zero-shot baseline is a ``zeroshot`` entry
with the same names and templates. Class logits are ``logit_scale`` times a
cosine (100, CLIP's trained value, as the four papers use).

* ``tip_adapter`` (Zhang et al. 2022, Tip-Adapter): training-free. The
  k-shot image embeddings are a cache's keys and their one-hot labels its
  values; logits = scale · f Wᵀ + alpha · exp(−beta (1 − f Kᵀ)) V, where W
  holds the zero-shot class embeddings. No gradient step, no optimiser;
  (alpha, beta) come from ``alpha_grid`` × ``beta_grid`` by leave-one-out
  accuracy on the shots (the paper searches a validation set, which a
  k-shot protocol does not have).
* ``clip_adapter`` (Gao et al. 2021, CLIP-Adapter): a residual two-layer
  MLP (d → d / ``reduction`` → d, ReLU after each, no biases) on the frozen
  image embedding, mixed as ratio · A(f) + (1 − ratio) · f and compared
  with the zero-shot class embeddings.
* ``coop`` (Zhou et al. 2022, CoOp): learned context vectors in place of the
  first template's words before '{}' (initialised from those words'
  embeddings; ``n_ctx`` > 0 instead learns that many vectors initialised
  from N(0, 0.02²)), shared by all classes; both towers frozen.
* ``vpt`` (Jia et al. 2022, VPT-shallow): ``num_prompts`` learned tokens
  appended to the image tokens of a ViT tower, compared with the zero-shot
  class embeddings; both towers frozen.

The trained kinds take ``steps`` Adam steps at learning rate ``lr`` on the
mean cross-entropy of ``train_batch`` examples per step, drawn with
replacement from the k-shot set by (seed, k): every random choice is a
function of the seed. One compiled step per entry serves every k and seed
(the batch indexes the whole loaded training split).

Costs per step: ``clip_adapter`` is two (train_batch × d × d / reduction)
matmuls on stored embeddings; ``coop`` runs the text tower forward and
backward on the C class prompts; ``vpt`` runs the image tower forward and
backward on ``train_batch`` images (P more tokens each).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlm_jax.data import tokenizers
from vlm_jax.errors import ConfigError, require
from vlm_jax.evaluators.base import Metrics, TransferEmbedder
from vlm_jax.evaluators.probe import LabelledSplits, shot_rows
from vlm_jax.evaluators.zeroshot import ZeroShot, check_label_range, topk_accuracy


@functools.partial(jax.jit, static_argnames=("loss", "lr"))
def adam_fit(state: Any, frozen: Any, index: jax.Array, *, loss: Callable, lr: float) -> tuple[Any, jax.Array]:
    """(state after one Adam step per row of ``index`` (steps, batch) on
    ``loss(state, frozen, rows)``, the loss of each step)."""
    opt = optax.adam(lr)

    def step(carry, rows):
        s, o = carry
        value, grad = jax.value_and_grad(loss)(s, frozen, rows)
        updates, o = opt.update(grad, o, s)
        return (optax.apply_updates(s, updates), o), value

    (state, _), values = jax.lax.scan(step, (state, opt.init(state)), index)
    return state, values


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


class _Transfer(LabelledSplits, ZeroShot):
    """The k-shot sets, the class embeddings and the metrics every kind
    shares. Subclasses implement ``fit(params, rows, k, seed) -> state`` and
    ``scores(params, state, split) -> (kept examples, classes)``."""

    FIELDS: ClassVar[dict[str, Any]] = {
        **ZeroShot.FIELDS,
        **LabelledSplits.TRAIN_FIELDS,
        "shots": (16,),
        "seeds": 3,
        "logit_scale": 100.0,
    }

    @classmethod
    def check(cls, entry, field: str) -> None:
        super().check(entry, field)
        cls.check_train_fields(entry, field)
        require(len(entry.shots) > 0 and all(k > 0 for k in entry.shots), f"{field}.shots",
                "must hold one or more positive counts")
        require(entry.seeds > 0, f"{field}.seeds", "must be positive")
        require(entry.logit_scale > 0, f"{field}.logit_scale", "must be positive")

    def setup(self) -> None:
        super().setup()  # class names, templates, prompt tokens; checks the evaluated splits' labels
        self.check_labelled()
        check_label_range(self.labels(self.entry.train_split), len(self.class_names), self.field,
                          self.entry.train_split)
        self.fit_log: dict[str, list[list[float]]] = {}  # "<k>shot" -> per seed, what FIT_LOG names
        if not isinstance(self.ctx.embedder, TransferEmbedder):
            raise ConfigError(f"config.{self.field}.kind: {self.entry.kind} needs a model scored by one pooled "
                              f"embedding per image and text; this objective's embedder "
                              f"({type(self.ctx.embedder).__name__}) is not")

    def class_embeddings(self, params) -> np.ndarray:
        """(C, d) zero-shot class embeddings (the template ensemble)."""
        prompts = self.ctx.encoded(("prompts", self.name), lambda: self.encoder.texts(params, self.prompt_tokens))
        return self.ctx.embedder.class_embeddings(np.asarray(prompts), len(self.class_names),
                                                  len(self.template_list))

    def train_embeddings(self, params) -> tuple[np.ndarray, np.ndarray]:
        """(image embeddings, labels) of the kept training examples."""
        return self.labelled(params, self.entry.train_split, "images")

    def eval_embeddings(self, params, split: str) -> tuple[np.ndarray, np.ndarray]:
        return self.labelled(params, split, "images")

    def evaluate_split(self, params, split: str) -> Metrics:
        fits = self.ctx.encoded((self.namespace, self.name), lambda: self._fit_all(params))
        y = self.labels(split)
        if not len(y):
            return {}
        out: Metrics = {}
        per_seed: dict[str, list[float]] = {}
        for k, states in fits.items():
            accs = [topk_accuracy(self.scores(params, s, split), y, (1,))["top1"] for s in states]  # ties count against
            out[f"{k}shot_top1"] = float(np.mean(accs))
            per_seed[f"{k}shot_top1"] = accs
        self.details[split] = {"per_seed": per_seed, **({self.FIT_LOG: self.fit_log} if self.fit_log else {})}
        return out

    def _fit_all(self, params) -> dict[int, list[Any]]:
        self.fit_log = {}  # this evaluation's; an earlier one's stays in its details
        _, y = self.train_embeddings(params)
        if not len(y):
            raise ConfigError(f"config.{self.field}: no training examples in {self.entry.train_split!r}")
        return {k: [self.fit(params, shot_rows(y, len(self.class_names), k, seed), k, seed)
                    for seed in range(self.entry.seeds)] for k in sorted(self.entry.shots)}

    FIT_LOG: ClassVar[str] = "train_loss"  # what fit_log holds per k and seed: (first, last) training loss

    def fit(self, params, rows: np.ndarray, k: int, seed: int) -> Any:
        raise NotImplementedError

    def scores(self, params, state: Any, split: str) -> np.ndarray:
        raise NotImplementedError


class TipAdapter(_Transfer):
    FIELDS: ClassVar[dict[str, Any]] = {**_Transfer.FIELDS, "alpha_grid": (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0),
                                        "beta_grid": (1.0, 3.0, 5.5, 10.0, 30.0, 100.0)}
    namespace = "tip_adapter"
    FIT_LOG = "alpha_beta"  # the chosen (alpha, beta) per k and seed

    @classmethod
    def check(cls, entry, field: str) -> None:
        super().check(entry, field)
        require(len(entry.alpha_grid) > 0 and all(a >= 0 for a in entry.alpha_grid), f"{field}.alpha_grid",
                "must hold one or more values >= 0")
        require(len(entry.beta_grid) > 0 and all(b > 0 for b in entry.beta_grid), f"{field}.beta_grid",
                "must hold one or more positive values")

    def logits(self, f: np.ndarray, keys: np.ndarray, values: np.ndarray, classes: np.ndarray, alpha: float,
               beta: float, leave_out: bool = False) -> np.ndarray:
        affinity = np.exp(-beta * (1.0 - f @ keys.T))
        if leave_out:  # f are the keys themselves: each is classified by the others
            np.fill_diagonal(affinity, 0.0)
        return self.entry.logit_scale * f @ classes.T + alpha * affinity @ values

    def fit(self, params, rows, k, seed):
        """The cache, and (alpha, beta) chosen from the grids by leave-one-out
        top-1 on the shots themselves (ties: the earlier grid value); with
        one-value grids, no choice is made."""
        x, y = self.train_embeddings(params)
        keys, values = x[rows], np.eye(len(self.class_names), dtype=np.float32)[y[rows]]
        classes = self.class_embeddings(params)
        best, best_acc = None, -1.0
        for alpha in self.entry.alpha_grid:
            for beta in self.entry.beta_grid:
                acc = topk_accuracy(self.logits(keys, keys, values, classes, alpha, beta, leave_out=True), y[rows],
                                    (1,))["top1"]
                if acc > best_acc:
                    best, best_acc = (float(alpha), float(beta)), acc
        self.fit_log.setdefault(f"{k}shot", []).append(list(best))
        return keys, values, best

    def scores(self, params, state, split):
        keys, values, (alpha, beta) = state
        f, _ = self.eval_embeddings(params, split)
        return self.logits(f, keys, values, self.class_embeddings(params), alpha, beta)


class _Tuned(_Transfer):
    """The trained kinds: Adam on a small state with the towers frozen."""

    FIELDS: ClassVar[dict[str, Any]] = {**_Transfer.FIELDS, "steps": 200, "lr": 1e-3, "train_batch": 256}

    @classmethod
    def check(cls, entry, field: str) -> None:
        super().check(entry, field)
        require(entry.steps > 0, f"{field}.steps", "must be positive")
        require(entry.lr > 0, f"{field}.lr", "must be positive")
        require(entry.train_batch > 0, f"{field}.train_batch", "must be positive")

    def batches(self, rows: np.ndarray, k: int, seed: int) -> np.ndarray:
        """(steps, train_batch) rows of the k-shot set, drawn by (seed, k)."""
        rng = np.random.default_rng([seed, k, 1])
        return rng.choice(rows, size=(self.entry.steps, self.entry.train_batch)).astype(np.int32)

    def init_key(self, k: int, seed: int) -> jax.Array:
        return jax.random.fold_in(jax.random.PRNGKey(seed), k)

    def train(self, state, frozen, rows, k, seed):
        state, losses = adam_fit(state, frozen, self.batches(rows, k, seed), loss=self.loss, lr=float(self.entry.lr))
        losses = np.asarray(losses)
        if not np.all(np.isfinite(losses)):
            raise ConfigError(f"config.{self.field}.lr: the {k}-shot fit (seed {seed}) diverged (loss "
                              f"{losses[-1]}); lower it")
        self.fit_log.setdefault(f"{k}shot", []).append([float(losses[0]), float(losses[-1])])
        return state

    def loss(self, state, frozen, rows) -> jax.Array:
        raise NotImplementedError


class ClipAdapter(_Tuned):
    FIELDS: ClassVar[dict[str, Any]] = {**_Tuned.FIELDS, "reduction": 4, "ratio": 0.2, "steps": 1000}
    namespace = "clip_adapter"

    @classmethod
    def check(cls, entry, field: str) -> None:
        super().check(entry, field)
        require(entry.reduction > 0, f"{field}.reduction", "must be positive")
        require(0 <= entry.ratio <= 1, f"{field}.ratio", "must be in [0, 1]")

    def adapt(self, state, f):
        w1, w2 = state
        a = jax.nn.relu(jax.nn.relu(f @ w1) @ w2)
        g = self.entry.ratio * a + (1.0 - self.entry.ratio) * f
        return g / jnp.linalg.norm(g, axis=-1, keepdims=True)

    def loss(self, state, frozen, rows):
        logits = self.entry.logit_scale * self.adapt(state, frozen["x"][rows]) @ frozen["classes"].T
        return cross_entropy(logits, frozen["y"][rows])

    def fit(self, params, rows, k, seed):
        x, y = self.train_embeddings(params)
        d = x.shape[1]
        hidden = max(1, d // self.entry.reduction)
        k1, k2 = jax.random.split(self.init_key(k, seed))
        init = jax.nn.initializers.lecun_normal()
        state = (init(k1, (d, hidden), jnp.float32), init(k2, (hidden, d), jnp.float32))
        return self.train(state, {"x": x, "y": y, "classes": self.class_embeddings(params)}, rows, k, seed)

    def scores(self, params, state, split):
        f, _ = self.eval_embeddings(params, split)
        return self.entry.logit_scale * np.asarray(self.adapt(state, jnp.asarray(f))) @ self.class_embeddings(params).T


class CoOp(_Tuned):
    FIELDS: ClassVar[dict[str, Any]] = {**_Tuned.FIELDS, "n_ctx": 0}
    namespace = "coop"

    @classmethod
    def check(cls, entry, field: str) -> None:
        super().check(entry, field)
        require(entry.n_ctx >= 0, f"{field}.n_ctx", "must be 0 (the first template's words) or positive")

    def setup(self) -> None:
        super().setup()
        if self.ctx.embedder.text_prompt_width is None:
            raise ConfigError(f"config.{self.field}.kind: coop learns context vectors of the text tower's input, "
                              f"and this objective's texts take none ({type(self.ctx.embedder).__name__}); "
                              f"use clip_adapter or tip_adapter")
        tok = self.ctx.tokenizer
        template = self.template_list[0]
        before = template.split("{}", 1)[0]
        words = tok.encode(before) if before.strip() else []
        if not self.entry.n_ctx and not words:
            raise ConfigError(f"config.{self.field}.n_ctx: the first template {template!r} has no words before "
                              f"'{{}}' to start the context from; give a positive n_ctx")
        length = self.ctx.text_len
        room = length - len(tok.prefix) - len(tok.suffix)
        encoded = []
        for name in self.class_names:
            ids = tok.encode(template.format(name))
            if self.entry.n_ctx:  # learned vectors before the whole prompt
                ids = [1] * self.entry.n_ctx + ids  # any real id: its embedding is replaced
            elif ids[:len(words)] != words:
                raise ConfigError(f"config.{self.field}.templates: {before!r} does not tokenise as the start of "
                                  f"{template.format(name)!r}; give a positive n_ctx to learn the context "
                                  f"before the whole template instead")
            encoded.append(ids)
        m = self.entry.n_ctx or len(words)
        require(m < room, f"{self.field}.n_ctx", f"{m} context tokens leave no room for the class name in "
                                                  f"config.model.text.max_len={length}")
        start = len(tok.prefix)
        self.ctx_tokens = tokenizers.rows_of_ids(tok, encoded, length)
        self.ctx_ids = self.ctx_tokens[0, start:start + m]
        self.ctx_where = np.zeros(self.ctx_tokens.shape, bool)
        self.ctx_where[:, start:start + m] = True
        self.ctx_slot = np.clip(np.arange(length) - start, 0, m - 1).astype(np.int32)  # position -> context vector
        self._texts = jax.jit(self.texts)

    def texts(self, params, ctx_vectors) -> jax.Array:
        vectors = jnp.broadcast_to(ctx_vectors[self.ctx_slot], (*self.ctx_tokens.shape, ctx_vectors.shape[-1]))
        return self.ctx.embedder.prompted_texts(params, self.ctx_tokens, self.ctx_where, vectors)

    def loss(self, state, frozen, rows):
        logits = self.entry.logit_scale * frozen["x"][rows] @ self.texts(frozen["params"], state).T
        return cross_entropy(logits, frozen["y"][rows])

    def fit(self, params, rows, k, seed):
        x, y = self.train_embeddings(params)
        if self.entry.n_ctx:
            width = self.ctx.embedder.text_prompt_width
            state = 0.02 * jax.random.normal(self.init_key(k, seed), (self.entry.n_ctx, width), jnp.float32)
        else:
            state = jax.jit(self.ctx.embedder.token_vectors)(params, self.ctx_ids).astype(jnp.float32)
        state = self.train(state, {"params": params, "x": x, "y": y}, rows, k, seed)
        return np.asarray(self._texts(params, state))  # the tuned class embeddings

    def scores(self, params, state, split):
        f, _ = self.eval_embeddings(params, split)
        return self.entry.logit_scale * f @ state.T


class VPT(_Tuned):
    FIELDS: ClassVar[dict[str, Any]] = {**_Tuned.FIELDS, "num_prompts": 8, "train_batch": 64, "steps": 300}
    namespace = "vpt"

    @classmethod
    def check(cls, entry, field: str) -> None:
        super().check(entry, field)
        require(entry.num_prompts > 0, f"{field}.num_prompts", "must be positive")

    def setup(self) -> None:
        super().setup()
        if self.ctx.embedder.image_prompt_width is None:
            raise ConfigError(f"config.{self.field}.kind: vpt adds prompt tokens to a ViT image tower, and this "
                              f"model's image tower takes none (config.model.image.tower="
                              f"{self.ctx.config.model.image.tower!r}); use clip_adapter or tip_adapter")
        self._encode = self.encoder.compile(self.ctx.embedder.prompted_images)

    def loss(self, state, frozen, rows):
        z = self.ctx.embedder.prompted_images(frozen["params"], frozen["images"][rows], state)
        return cross_entropy(self.entry.logit_scale * z @ frozen["classes"].T, frozen["y"][rows])

    def fit(self, params, rows, k, seed):
        split = self.entry.train_split
        images, y = self.labelled_split(split)["image"][self.kept(split)], self.labels(split)
        width = self.ctx.embedder.image_prompt_width
        state = 0.02 * jax.random.normal(self.init_key(k, seed), (self.entry.num_prompts, width), jnp.float32)
        frozen = {"params": params, "images": images, "y": y, "classes": self.class_embeddings(params)}
        return np.asarray(self.train(state, frozen, rows, k, seed))

    def scores(self, params, state, split):
        keep = self.kept(split)
        z = self.encoder.run(self._encode, params, self.labelled_split(split)["image"][keep], jnp.asarray(state))
        return self.entry.logit_scale * z @ self.class_embeddings(params).T
