"""The region–word sigmoid loss equals its float64 formula on 1, 2, 4 and 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from reference import region_word_loss_and_grads, sigmoid_loss_and_grads, unit_rows
from vlm_jax import losses

IMPLS = [("all_gather", None), ("ring", None), ("tiled", None), ("tiled", 2), ("tiled", 3)]


def _mesh(n):
    return Mesh(np.asarray(jax.devices()[:n]), ("data",), axis_types=(AxisType.Auto,))


def _close(actual, expected, rtol=1e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert np.abs(actual - expected).max() <= rtol * max(np.abs(expected).max(), 1e-30), (actual, expected)


def _case(seed, B=16, R=3, P=2, d=8):
    rng = np.random.default_rng(seed)
    regions = unit_rows(rng, B * R, d).reshape(B, R, d)
    phrases = unit_rows(rng, B * P, d).reshape(B, P, d)
    rkeys, pkeys = rng.integers(-1, 4, (B, R)), rng.integers(-1, 4, (B, P))  # repeated keys across examples
    rw, pw = (rng.random((B, R)) < 0.7).astype(np.float32), (rng.random((B, P)) < 0.8).astype(np.float32)
    return regions, rkeys, rw, phrases, pkeys, pw


def _run(inputs, impl, tile, mesh, log_t=1.5, bias=-2.0):
    regions, rkeys, rw, phrases, pkeys, pw = inputs
    put = (lambda x, dt: jax.device_put(jnp.asarray(x, dt), NamedSharding(mesh, P("data")))) if mesh else \
        (lambda x, dt: jnp.asarray(x, dt))

    def f(zr, zp, lt, b):
        return losses.region_word_loss(zr, put(rkeys, jnp.int32), put(rw, jnp.float32), zp, put(pkeys, jnp.int32),
                                       put(pw, jnp.float32), lt, b, impl=impl, mesh=mesh, tile=tile)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(
        put(regions, jnp.float32), put(phrases, jnp.float32), jnp.float32(log_t), jnp.float32(bias))


@pytest.mark.parametrize("n", (1, 2, 4, 8))
@pytest.mark.parametrize("impl,tile", IMPLS)
def test_region_word_matches_float64_reference(impl, tile, n):
    inputs = _case(n)
    value, grads = _run(inputs, impl, tile, _mesh(n))
    ref, g = region_word_loss_and_grads(*inputs, 1.5, -2.0)
    _close(value, ref)
    for got, key in zip(grads, ("regions", "phrases", "log_t", "bias")):
        _close(got, g[key])


def test_without_a_mesh_is_the_formula():
    inputs = _case(9)
    value, grads = _run(inputs, "all_gather", None, None)
    ref, g = region_word_loss_and_grads(*inputs, 1.5, -2.0)
    _close(value, ref)
    _close(grads[0], g["regions"])


def test_one_slot_each_with_distinct_keys_is_siglip():
    """R = P = 1, key = example index, all weights 1: SigLIP's loss exactly."""
    rng = np.random.default_rng(3)
    zi, zt = unit_rows(rng, 16, 8), unit_rows(rng, 16, 8)
    keys, ones = np.arange(16)[:, None], np.ones((16, 1), np.float32)
    value, grads = _run((zi[:, None], keys, ones, zt[:, None], keys, ones), "ring", None, _mesh(4), 2.0, -3.0)
    ref, g = sigmoid_loss_and_grads(zi, zt, 2.0, -3.0)
    _close(value, ref)
    _close(grads[0][:, 0], g["zimg"])
    _close(grads[1][:, 0], g["ztxt"])


def test_empty_slots_change_nothing():
    """Weight-0 slots contribute nothing, whatever their embeddings and keys."""
    regions, rkeys, rw, phrases, pkeys, pw = _case(4, R=2, P=2)
    rw[:, 1] = 0.0
    pw[:, 1] = 0.0
    a, _ = _run((regions, rkeys, rw, phrases, pkeys, pw), "tiled", 2, _mesh(2))
    b, _ = _run((regions[:, :1], rkeys[:, :1], rw[:, :1], phrases[:, :1], pkeys[:, :1], pw[:, :1]), "all_gather",
                None, _mesh(2))
    _close(a, b)


def test_shape_errors_name_the_loss():
    regions, rkeys, rw, phrases, pkeys, pw = _case(0)
    with pytest.raises(ValueError, match="region_word_loss: expected"):
        losses.region_word_loss(jnp.asarray(regions), jnp.asarray(rkeys[:, :1]), jnp.asarray(rw), jnp.asarray(phrases),
                                jnp.asarray(pkeys), jnp.asarray(pw), 1.0, 0.0)
