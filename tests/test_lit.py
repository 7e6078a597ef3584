"""LiT: an image tower loaded from another run and frozen; freezing and lr rules."""

import jax
import numpy as np
import pytest

from conftest import load_tiny_config
from vlm_jax import checkpoint, metrics, rules, session, train

LIT = {
    "model_init.rules": '(("^(image|img_proj)/", r"\\1/"),)',
    "train.freeze": '("^image/", "^img_proj/")',
    "train.steps": 6,
    "train.eval_every": 0,
}


def _params(workdir, cfg):
    run = session.setup(cfg)
    mgr = checkpoint.manager(workdir, 2)
    state, _ = checkpoint.restore(mgr, mgr.latest_step(), session.with_shardings(run.abstract, run.state_sh))
    return jax.device_get(state)


def test_lit_loads_and_freezes_the_image_tower(trained_softmax, data_dir, tmp_path):
    source_dir, _ = trained_softmax
    source = rules._flat(_params(source_dir, load_tiny_config(data_dir))["params"])
    cfg = load_tiny_config(data_dir, **LIT, **{"model_init.workdir": source_dir})
    train.train(cfg, str(tmp_path))
    state = _params(str(tmp_path), cfg)
    after = rules._flat(state["params"])
    image_keys = [k for k in after if k.startswith(("image/", "img_proj/"))]
    assert image_keys
    for k in image_keys:  # loaded from the source run and never changed
        np.testing.assert_array_equal(after[k], source[k])
    assert any(not np.array_equal(after[k], source[k]) for k in after if k.startswith("text/"))
    opt_paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(state["opt_state"])]
    assert opt_paths and not any("image" in str(p) or "img_proj" in str(p) for p in opt_paths)
    losses = [r["train/loss"] for r in metrics.read_metrics(str(tmp_path))]
    assert losses[-1] < losses[0]


def test_model_init_errors_name_the_parameter(trained_softmax, data_dir, tmp_path):
    source_dir, _ = trained_softmax
    wider = load_tiny_config(data_dir, **LIT, **{"model_init.workdir": source_dir, "model.image.mlp_dim": 96})
    with pytest.raises(ValueError, match=r"image/encoder/block0/mlp/fc1/bias has shape \(96,\) but .* has shape \(64,\)"):
        train.train(wider, str(tmp_path / "a"))
    missing = load_tiny_config(data_dir, **{"model_init.workdir": source_dir, "model_init.rules": '(("^image/", "vision/"),)'})
    with pytest.raises(ValueError, match=r"maps to vision/.* does not hold"):
        train.train(missing, str(tmp_path / "b"))
    with pytest.raises(ValueError, match=r"config.train.freeze: rule '\^imgae/' matches no parameter"):
        session.setup(load_tiny_config(data_dir, **{"train.freeze": '("^imgae/",)'}))


def test_lr_rules_scale_the_update(data_dir, tmp_path):
    cfg = load_tiny_config(data_dir, **{"optim.lr_rules": '(("^text/", 0.0),)', "train.steps": 3,
                                        "train.eval_every": 0})
    run = session.setup(cfg)
    init = jax.jit(run.init_state, out_shardings=run.state_sh)  # exactly as train() initialises
    before = rules._flat(jax.device_get(init(jax.random.PRNGKey(cfg.seed))["params"]))
    train.train(cfg, str(tmp_path))
    after = rules._flat(_params(str(tmp_path), cfg)["params"])
    for k in after:
        if k.startswith("text/") and not k.endswith("kernel"):  # lr 0: unchanged (decay is lr-scaled too)
            np.testing.assert_array_equal(after[k], before[k])
    assert not np.array_equal(after["img_proj/kernel"], before["img_proj/kernel"])
