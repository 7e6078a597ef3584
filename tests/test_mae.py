"""Masked image modelling (MAE as CLIP's auxiliary): the loss against
float64 on 1, 2, 4 and 8 devices, patches, masking, the ViT's kept tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from conftest import collectives, load_tiny_config
from reference import mae_loss_and_grads
from vlm_jax import session
from vlm_jax.errors import ConfigError
from vlm_jax.losses import reconstruction
from vlm_jax.models import mae as mae_models, towers
from vlm_jax.objectives import mae


@pytest.mark.parametrize("n", (1, 2, 4, 8))
def test_mae_loss_matches_float64_on_every_device_count(n):
    rng = np.random.default_rng(n)
    B, S, p = 16, 12, 4
    images = rng.uniform(-1, 1, (B, S, S, 3))
    images[0, :p, :p] = 0.25  # a flat patch: its target is 0 (the ε keeps it finite)
    pred = rng.standard_normal((B, (S // p) ** 2, p * p * 3))
    dropped = rng.random((B, (S // p) ** 2)) < 0.75
    mesh = Mesh(np.asarray(jax.devices()[:n]), ("data",), axis_types=(AxisType.Auto,))
    put = lambda x: jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("data")))  # noqa: E731

    def loss(pr, im, d):
        return reconstruction.mae_loss(*reconstruction.masked_mse(pr, reconstruction.pixel_targets(im, p), d))

    value, grad = jax.jit(jax.value_and_grad(loss))(put(pred.astype(np.float32)), put(images.astype(np.float32)),
                                                    put(dropped))
    ref, ref_grad = mae_loss_and_grads(pred, images, dropped, p)
    assert abs(float(value) - ref) <= 1e-5 * abs(ref)
    np.testing.assert_allclose(np.asarray(grad, np.float64), ref_grad, atol=1e-5 * np.abs(ref_grad).max())


def test_patchify_is_row_major_patches_of_row_col_channel_pixels():
    images = np.random.default_rng(0).standard_normal((2, 8, 12, 3)).astype(np.float32)
    got = np.asarray(reconstruction.patchify(jnp.asarray(images), 4))
    assert got.shape == (2, 6, 48)
    for j in range(6):
        r, c = divmod(j, 3)
        np.testing.assert_array_equal(got[:, j], images[:, 4 * r:4 * r + 4, 4 * c:4 * c + 4].reshape(2, -1))


def test_drop_patches_keeps_a_quarter_in_order_and_is_a_function_of_the_generator():
    example = {"image": np.zeros((32, 32, 3), np.uint8)}
    kept = set()
    for seed in range(50):
        out = mae.drop_patches(example, np.random.default_rng(seed), patch=4, ratio=0.75)
        keep, dropped = out["mae_keep"], out["mae_dropped"]
        assert keep.shape == (16,) and dropped.shape == (64,) and dropped.sum() == 48
        assert (np.diff(keep) > 0).all() and not dropped[keep].any()
        kept.update(keep.tolist())
        again = mae.drop_patches(example, np.random.default_rng(seed), patch=4, ratio=0.75)
        np.testing.assert_array_equal(again["mae_keep"], keep)
    assert len(kept) == 64  # every position gets kept by some draw


def test_the_decoder_places_kept_tokens_in_their_rows_without_collectives():
    """Every kept token lands at its own row's position and the rest hold the
    mask token; with the batch split over 4 devices, the decoder's forward
    and backward need no collective beyond the parameter gradients' sum
    (scattering with (arange(B), keep) all-reduced a (B, n, w) array)."""
    m = mae_models.MAEDecoder(grid=4, patch=2, width=16, depth=1, mlp_dim=32, num_heads=2)
    rng = np.random.default_rng(0)
    b, k = 8, 5
    tokens = rng.standard_normal((b, k, 12)).astype(np.float32)
    keep = np.stack([rng.permutation(16)[:k] for _ in range(b)]).astype(np.int32)
    x = rng.standard_normal((b, k, 16)).astype(np.float32)
    full = np.broadcast_to(rng.standard_normal((1, 1, 16)).astype(np.float32), (b, 16, 16))
    want = full.copy()
    for i in range(b):
        want[i, keep[i]] = x[i]
    np.testing.assert_array_equal(mae_models._place_rows(jnp.asarray(full), jnp.asarray(keep), jnp.asarray(x)), want)

    params = m.init(jax.random.PRNGKey(0), tokens, keep)
    found = collectives(lambda p, t, kk: jnp.sum(m.apply(p, t, kk) ** 2), params, tokens, keep)
    assert all(op == "all-reduce" and "[8," not in shape for op, shape in found), found


def test_the_vit_encodes_only_the_kept_patches():
    vit = towers.ViT(patch_size=4, width=16, depth=2, mlp_dim=32, num_heads=2, pool="cls")
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((2, 16, 16, 3)), jnp.float32)
    params = vit.init(jax.random.PRNGKey(0), images)
    full = vit.apply(params, images)
    every = vit.apply(params, images, jnp.tile(jnp.arange(16, dtype=jnp.int32), (2, 1)))
    for a, b in zip(full, every):  # keeping every patch is the plain forward pass
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    keep = jnp.asarray([[0, 5, 10, 15], [1, 2, 3, 4]], jnp.int32)
    pooled, tokens = vit.apply(params, images, keep)
    assert tokens.shape == (2, 4, 16)
    # pixels of a dropped patch (row 0: patch 1, at rows 0-3, cols 4-7) change nothing
    _, other = vit.apply(params, images.at[0, 0:4, 4:8].set(5.0), keep)
    np.testing.assert_array_equal(np.asarray(other[0]), np.asarray(tokens[0]))


@pytest.mark.parametrize("extra,match", [({"model.image.tower": "resnet"}, "config.model.image.tower: masked image"),
                                         ({}, "config.model.image.stem: masked image"),
                                         ({"model.image.stem": "()", "loss.mask_ratio": 1.0},
                                          "config.loss.mask_ratio")])
def test_mae_config_errors_name_the_field(data_dir, extra, match):
    with pytest.raises(ConfigError, match=match):  # the tiny config's ViT has a stem unless it is removed
        session.setup(load_tiny_config(data_dir, "configs/vit.py:mae", **extra))
