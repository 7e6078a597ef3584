"""Distillation: a frozen teacher beside the student, and the terms against direct computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_overrides
from vlm_jax import config as config_lib, metrics, parallel, rules, session, train
from vlm_jax.errors import ConfigError
from vlm_jax.objectives.distill import kl_rows

STUDENT = {"model.text.width": 16, "model.image.width": 16, "model.text.mlp_dim": 32, "model.image.mlp_dim": 32}


def _config(teacher, data_dir, **extra):
    overrides = [o[len("--config."):] for o in tiny_overrides(data_dir, **{**STUDENT, **extra})]
    return config_lib.load_config(f"configs/distill.py:{teacher}", overrides)


def test_kl_terms_match_numpy():
    rng = np.random.default_rng(0)
    t, s = rng.normal(size=(6, 6)) * 3, rng.normal(size=(6, 6)) * 3

    def kl(a, b):
        p, q = np.exp(a - a.max(1, keepdims=True)), np.exp(b - b.max(1, keepdims=True))
        p, q = p / p.sum(1, keepdims=True), q / q.sum(1, keepdims=True)
        return np.mean(np.sum(p * np.log(p / q), 1))

    assert float(kl_rows(jnp.asarray(t), jnp.asarray(s), 1)) == pytest.approx(kl(t, s), rel=1e-5)
    assert float(kl_rows(jnp.asarray(t), jnp.asarray(s), 0)) == pytest.approx(kl(t.T, s.T), rel=1e-5)
    assert float(kl_rows(jnp.asarray(t), jnp.asarray(t), 1)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_the_student_trains_beside_a_frozen_teacher(trained_softmax, data_dir, tmp_path):
    teacher, _ = trained_softmax
    cfg = _config(teacher, data_dir, **{"train.steps": 6, "train.eval_every": 0, "train.checkpoint_every": 6,
                                        "mesh.data": 2})
    train.train(cfg, str(tmp_path))
    rows = [r for r in metrics.read_metrics(str(tmp_path)) if "train/loss" in r]
    assert rows[-1]["train/similarity_loss"] < rows[0]["train/similarity_loss"]
    assert rows[-1]["train/embed_loss"] < rows[0]["train/embed_loss"]
    run = session.setup(cfg)
    _, student = session.restore_params(cfg, run, str(tmp_path))
    source, _ = rules.load_params(teacher)
    flat = {parallel.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(student["teacher"])}
    assert set(flat) == set(source)
    for path, value in flat.items():  # frozen: the teacher's checkpoint, bit for bit
        np.testing.assert_array_equal(value, source[path], err_msg=path)
    size = lambda tree: sum(np.size(x) for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    assert size({k: v for k, v in student.items() if k != "teacher"}) < size(student["teacher"])  # a smaller student


def test_distillation_config_mistakes_are_named(trained_softmax, data_dir):
    teacher, _ = trained_softmax
    with pytest.raises(ConfigError, match=r"config.train.freeze: must freeze the teacher"):
        _config(teacher, data_dir, **{"train.freeze": "()"})
    with pytest.raises(ConfigError, match=r"config.model.embed_dim: must be the teacher's"):
        _config(teacher, data_dir, **{"model.embed_dim": 16})
    with pytest.raises(ConfigError, match=r"config.loss.teacher_workdir: cannot read"):
        config_lib.load_config("configs/distill.py:/nonexistent", [])
