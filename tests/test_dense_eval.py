"""Zero-shot segmentation and detection: the metrics are exact (an oracle
gets mIoU 1), and each piece agrees with a direct computation."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import load_tiny_config
from vlm_jax import evaluators, session
from vlm_jax.data import scenes, shapes_tfds, tokenizers
from vlm_jax.errors import ConfigError
from vlm_jax.evaluators.dense import average_precision, iou_metrics, patch_labels

SPLITS = ("test_seen", "test_unseen")
GRID = 4  # the tiny config's ViT: 32 px, patch 8


def _truth_by_image(split: str, size: int = 32, grid: int = GRID) -> dict[bytes, np.ndarray]:
    """Eval-frame image bytes -> (grid²,) patch labels, computed here from the
    scenes' own masks: the most frequent class in each patch (classes
    0..39, background 40), ties to the lowest."""
    out = {}
    c = len(scenes.composition_names())
    for _, s in scenes.iter_scenes(0, split, 256, shapes_tfds.IMAGE_SIZE):
        image = np.asarray(Image.open(io.BytesIO(s.image_png)))
        small = image.reshape(size, 2, size, 2, 3).astype(np.float32).mean(axis=(1, 3))
        small = np.round(small).astype(np.uint8)  # the eval crop: a 2 × 2 block mean
        mask = np.asarray(Image.open(io.BytesIO(s.mask_png)))[1::2, 1::2]
        lut = np.asarray([c] + [o.label for o in s.objects])
        classes = lut[mask]
        p = size // grid
        labels = []
        for gy in range(grid):
            for gx in range(grid):
                values, counts = np.unique(classes[gy * p:(gy + 1) * p, gx * p:(gx + 1) * p], return_counts=True)
                labels.append(values[counts == counts.max()].min())
        out[small.tobytes()] = np.asarray(labels, np.int32)
    return out


class _Oracle(evaluators.Embedder, evaluators.base.DenseEmbedder):
    """Patch tokens: one-hot of the patch's true label (``shift`` added,
    modulo the labels: a wrong oracle); prompts: one-hot of their class
    (looked up on the host by token row)."""

    def __init__(self, truth: dict[bytes, np.ndarray], prompts: dict[bytes, int], labels: int, shift: int = 0):
        self.truth, self.prompts, self.labels, self.shift = truth, prompts, labels, shift

    def _host(self, fn, x, shape):
        return jax.pure_callback(fn, jax.ShapeDtypeStruct(shape, jnp.float32), x, vmap_method="sequential")

    def patches(self, params, images):
        def look(imgs):
            rows = [(self.truth[np.asarray(im).tobytes()] + self.shift) % self.labels for im in imgs]
            return np.eye(self.labels, dtype=np.float32)[np.stack(rows)]
        return self._host(look, images, (images.shape[0], GRID * GRID, self.labels))

    def texts(self, params, tokens):
        return self._host(lambda t: np.eye(self.labels, dtype=np.float32)[
            [self.prompts[np.asarray(r).tobytes()] for r in t]], tokens, (tokens.shape[0], self.labels))

    def images(self, params, images):
        return self.patches(params, images).mean(axis=1)

    def scores(self, img, txt):
        return img @ txt.T, txt @ img.T

    def class_scores(self, img, prompts, num_classes, num_templates):
        z = prompts.reshape(num_classes, num_templates, -1).mean(axis=1)
        return img @ (z / np.linalg.norm(z, axis=1, keepdims=True)).T


def _segmentation_suite(data_dir, shift=0):
    cfg = load_tiny_config(data_dir, **{"evals.zeroshot.splits": "()", "evals.retrieval.splits": "()",
                                        "evals.segmentation.splits": str(SPLITS),
                                        "evals.segmentation.max_examples": 48,
                                        "mesh.data": 1})  # one device: the oracle's host lookups see whole batches
    run = session.setup(cfg)
    names = scenes.composition_names()
    prompt_rows = tokenizers.tokenize(run.ds.tokenizer, [f"a {n}" for n in names] + ["background"],
                                      cfg.model.text.max_len)
    prompts = {row.tobytes(): k for k, row in enumerate(prompt_rows)}
    truth = {k: v for split in SPLITS for k, v in _truth_by_image(split).items()}
    oracle = _Oracle(truth, prompts, len(names) + 1, shift)
    return evaluators.Suite(cfg, run.mesh, oracle, run.ds)


def test_an_oracle_gets_miou_one(data_dir):
    out = _segmentation_suite(data_dir).run({})
    for split in SPLITS:
        assert out[f"segmentation/{split}/miou"] == 1.0
        assert out[f"segmentation/{split}/acc"] == 1.0
        assert out[f"segmentation/{split}/background_iou"] == 1.0


def test_a_wrong_oracle_does_not(data_dir):
    out = _segmentation_suite(data_dir, shift=1).run({})
    for split in SPLITS:
        assert out[f"segmentation/{split}/acc"] == 0.0 and out[f"segmentation/{split}/miou"] == 0.0


def test_patch_labels_take_the_most_frequent_class_ties_to_the_lowest():
    classes = np.full((1, 4, 4), -1)
    classes[0, :2, :2] = [[3, 3], [5, -1]]  # 3 wins the top-left patch
    classes[0, :2, 2:] = [[7, 7], [-1, -1]]  # a tie of 7 and background: 7
    classes[0, 2:, :2] = [[1, 2], [2, 1]]  # a tie of 1 and 2: 1
    np.testing.assert_array_equal(patch_labels(classes, 2, 10), [[3, 7, 1, 10]])


def test_iou_and_average_precision_match_direct_computations():
    rng = np.random.default_rng(0)
    truth, pred = rng.integers(0, 4, 500), rng.integers(0, 4, 500)
    pred[truth == 3] = 3  # class 3 found wherever it is
    iou, m = iou_metrics(pred, truth, 5)  # label 4 never occurs: no union, left out
    direct = [((pred == k) & (truth == k)).sum() / ((pred == k) | (truth == k)).sum() for k in range(4)]
    np.testing.assert_allclose(iou[:4], direct)
    assert np.isnan(iou[4]) and m["miou"] == pytest.approx(np.mean(direct)) and m["acc"] == np.mean(pred == truth)
    # Positives at ranks 1, 3 and 4 of 5: AP = (1/1 + 2/3 + 3/4) / 3.
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6, 0.1]), np.array([1, 0, 1, 1, 0], bool)) == \
        pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    assert average_precision(np.array([0.1, 0.5, 0.3]), np.array([0, 1, 1], bool)) == 1.0


def test_detection_runs_on_a_model_and_an_embedder_without_patches_is_refused(data_dir):
    cfg = load_tiny_config(data_dir, **{"evals.zeroshot.splits": "()", "evals.retrieval.splits": "()",
                                        "evals.detection.splits": "('test_seen',)",
                                        "evals.detection.max_examples": 32})
    run = session.setup(cfg)
    params = jax.jit(run.init_state, out_shardings=run.state_sh)(jax.random.PRNGKey(0))["params"]
    out = evaluators.Suite(cfg, run.mesh, run.objective.embedder(), run.ds).run(params)
    assert 0.0 <= out["detection/test_seen/top1"] <= 1.0 and 0.0 < out["detection/test_seen/map"] <= 1.0
    from vlm_jax.objectives.filip import TokenEmbedder

    with pytest.raises(ConfigError, match=r"config.evals.detection.kind: 'detection' needs patch tokens"):
        evaluators.Suite(cfg, run.mesh, TokenEmbedder(run.model), run.ds)
