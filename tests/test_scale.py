"""remat, scan and bf16 compute give the plain model's loss and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import losses
from vlm_jax.config import base_config
from vlm_jax import models


def _model(**model_overrides):
    c = base_config().model
    c.update(dict(embed_dim=32, **{k: v for k, v in model_overrides.items() if k in ("dtype", "remat", "scan")}))
    c.image.update(dict(width=32, depth=3, mlp_dim=64, num_heads=2))
    c.text.update(dict(width=32, depth=2, mlp_dim=64, num_heads=2))
    return models.make_model(c, 64)


def _batch():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-1, 1, (8, 32, 32, 3)), jnp.float32)
    tokens = np.zeros((8, 16), np.int32)
    for i in range(8):
        n = rng.integers(3, 15)
        tokens[i, :n] = rng.integers(3, 64, n)
        tokens[i, n] = 2
    return images, jnp.asarray(tokens)


def _loss_and_grads(model, params, images, tokens):
    def f(p):
        zi, zt = model.apply({"params": p}, images, tokens)
        return losses.softmax_loss(zi, zt, jnp.float32(2.0))

    return jax.value_and_grad(f)(params)


def _stack_blocks(params):
    """Plain block{i} parameters -> the scanned layout blocks/block with a depth axis."""
    def convert(tree):
        if not isinstance(tree, dict):
            return tree
        blocks = sorted((k for k in tree if k.startswith("block") and k[5:].isdigit()), key=lambda k: int(k[5:]))
        out = {k: convert(v) for k, v in tree.items() if k not in blocks}
        if blocks:
            out["blocks"] = {"block": jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[tree[b] for b in blocks])}
        return out

    return convert(params)


@pytest.fixture(scope="module")
def plain():
    images, tokens = _batch()
    model = _model()
    params = model.init(jax.random.PRNGKey(0), images, tokens)["params"]
    return images, tokens, params, _loss_and_grads(model, params, images, tokens)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_with_batch"])
def test_remat_gives_the_same_loss_and_gradients(plain, policy):
    images, tokens, params, (loss, grads) = plain
    loss_r, grads_r = _loss_and_grads(_model(remat=policy), params, images, tokens)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grads_r), jax.tree_util.tree_leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scan_over_blocks_gives_the_same_loss_and_gradients(plain, remat):
    images, tokens, params, (loss, grads) = plain
    model = _model(scan=True, remat=remat)
    stacked = _stack_blocks(params)
    expected_structure = jax.tree_util.tree_structure(model.init(jax.random.PRNGKey(1), images, tokens)["params"])
    assert jax.tree_util.tree_structure(stacked) == expected_structure
    loss_s, grads_s = _loss_and_grads(model, stacked, images, tokens)
    np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(grads_s), jax.tree_util.tree_leaves(_stack_blocks(grads))):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)


def test_bfloat16_compute_stays_close_to_float32(plain):
    images, tokens, params, (loss, _) = plain
    loss_bf16, grads = _loss_and_grads(_model(dtype="bfloat16"), params, images, tokens)
    assert loss_bf16.dtype == jnp.float32  # the loss is computed in float32 whatever the towers use
    np.testing.assert_allclose(loss_bf16, loss, rtol=2e-2)
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))  # parameters stay float32


# --------------------------------------------------------------------------- FSDP


def test_fsdp_splits_large_parameters_and_moments_and_matches_data_parallel(data_dir, tmp_path):
    from conftest import load_tiny_config
    from vlm_jax import metrics, parallel, session, train

    common = {"train.steps": 20, "train.eval_every": 0, "train.checkpoint_every": 100, "train.log_every": 1,
              "mesh.fsdp_min_size": 1024}
    cfg = load_tiny_config(data_dir, **common, **{"mesh.fsdp": 8})
    run = session.setup(cfg)
    assert dict(run.mesh.shape) == {"data": 1, "fsdp": 8}
    state = jax.jit(run.init_state, out_shardings=run.state_sh)(jax.random.PRNGKey(cfg.seed))
    large = 0
    for path, x in jax.tree_util.tree_leaves_with_path(state):
        if x.size >= 1024:
            large += 1
            shard = x.addressable_shards[0].data
            assert shard.size * 8 == x.size, (parallel.path_str(path), x.shape, shard.shape)
    assert large > 20  # kernels and both Adam moments of each
    train.train(cfg, str(tmp_path / "fsdp"))
    train.train(load_tiny_config(data_dir, **common), str(tmp_path / "dp"))
    fsdp_loss = [r["train/loss"] for r in metrics.read_metrics(str(tmp_path / "fsdp"))]
    dp_loss = [r["train/loss"] for r in metrics.read_metrics(str(tmp_path / "dp"))]
    assert len(fsdp_loss) == 20
    np.testing.assert_allclose(fsdp_loss, dp_loss, rtol=1e-4)


def test_bfloat16_parameter_storage_and_float32_moments(data_dir, tmp_path):
    from conftest import load_tiny_config
    from vlm_jax import metrics, session, train

    common = {"train.steps": 4, "train.eval_every": 0, "train.log_every": 1}
    cfg = load_tiny_config(data_dir, **common, **{"model.param_dtype": "bfloat16", "model.dtype": "bfloat16",
                                                  "optim.mu_dtype": "float32"})
    run = session.setup(cfg)
    params = run.abstract["params"]
    assert params["image"]["encoder"]["block0"]["mlp"]["fc1"]["kernel"].dtype == jnp.bfloat16
    assert params["log_t"].dtype == jnp.float32
    mu = [x for p, x in jax.tree_util.tree_leaves_with_path(run.abstract["opt_state"]) if "mu" in str(p)]
    assert mu and all(x.dtype == jnp.float32 for x in mu)
    train.train(cfg, str(tmp_path / "bf16"))
    train.train(load_tiny_config(data_dir, **common), str(tmp_path / "f32"))
    bf16 = [r["train/loss"] for r in metrics.read_metrics(str(tmp_path / "bf16"))]
    f32 = [r["train/loss"] for r in metrics.read_metrics(str(tmp_path / "f32"))]
    np.testing.assert_allclose(bf16[0], f32[0], rtol=2e-2)
    assert bf16[-1] < bf16[0]
