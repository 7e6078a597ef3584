"""Sharded losses equal the float64 single-device formula in value and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from reference import sigmoid_loss_and_grads, softmax_loss_and_grads, unit_rows
from vlm_jax import losses

DEVICE_COUNTS = (1, 2, 4, 8)


def _mesh(n):
    return Mesh(np.asarray(jax.devices()[:n]), ("data",), axis_types=(AxisType.Auto,))


def _put(x, mesh):
    return jax.device_put(jnp.asarray(x, jnp.float32), NamedSharding(mesh, P("data")))


def _close(actual, expected, rtol=1e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(np.abs(expected).max(), 1e-30)
    assert np.abs(actual - expected).max() <= rtol * scale, (actual, expected)


@pytest.mark.parametrize("n", DEVICE_COUNTS)
@pytest.mark.parametrize("seed,B,d,log_t", [(0, 16, 8, np.log(1 / 0.07)), (1, 24, 32, 1.0), (2, 40, 16, 3.0)])
def test_softmax_all_gather_matches_reference(n, seed, B, d, log_t):
    rng = np.random.default_rng(seed)
    zi, zt = unit_rows(rng, B, d), unit_rows(rng, B, d)
    mesh = _mesh(n)
    fn = jax.jit(jax.value_and_grad(
        lambda a, b, lt: losses.softmax_loss(a, b, lt, impl="all_gather", mesh=mesh), argnums=(0, 1, 2)))
    value, (gi, gt, glt) = fn(_put(zi, mesh), _put(zt, mesh), jnp.float32(log_t))
    ref, g = softmax_loss_and_grads(zi, zt, log_t)
    assert value.dtype == jnp.float32 and value.shape == ()
    _close(value, ref)
    _close(gi, g["zimg"])
    _close(gt, g["ztxt"])
    _close(glt, g["log_t"])


@pytest.mark.parametrize("n", DEVICE_COUNTS)
@pytest.mark.parametrize("seed,B,d,log_t,bias", [(0, 16, 8, np.log(10.0), -10.0), (1, 24, 32, 1.0, 0.5), (2, 40, 16, 2.0, -3.0)])
def test_sigmoid_all_gather_matches_reference(n, seed, B, d, log_t, bias):
    rng = np.random.default_rng(seed)
    zi, zt = unit_rows(rng, B, d), unit_rows(rng, B, d)
    mesh = _mesh(n)
    fn = jax.jit(jax.value_and_grad(
        lambda a, b, lt, bb: losses.sigmoid_loss(a, b, lt, bb, impl="all_gather", mesh=mesh), argnums=(0, 1, 2, 3)))
    value, (gi, gt, glt, gb) = fn(_put(zi, mesh), _put(zt, mesh), jnp.float32(log_t), jnp.float32(bias))
    ref, g = sigmoid_loss_and_grads(zi, zt, log_t, bias)
    _close(value, ref)
    _close(gi, g["zimg"])
    _close(gt, g["ztxt"])
    _close(glt, g["log_t"])
    _close(gb, g["bias"])


def test_dense_formulas_without_mesh_match_reference():
    rng = np.random.default_rng(3)
    zi, zt = unit_rows(rng, 12, 8), unit_rows(rng, 12, 8)
    v, g = jax.value_and_grad(losses.softmax_loss, argnums=(0, 1, 2))(jnp.float32(zi), jnp.float32(zt), jnp.float32(2.0))
    ref, rg = softmax_loss_and_grads(zi, zt, 2.0)
    _close(v, ref)
    _close(g[2], rg["log_t"])
    v, g = jax.value_and_grad(losses.sigmoid_loss, argnums=(0, 1, 2, 3))(
        jnp.float32(zi), jnp.float32(zt), jnp.float32(2.0), jnp.float32(-1.0))
    ref, rg = sigmoid_loss_and_grads(zi, zt, 2.0, -1.0)
    _close(v, ref)
    _close(g[3], rg["bias"])


def test_bfloat16_inputs_accumulate_in_float32():
    rng = np.random.default_rng(4)
    zi, zt = unit_rows(rng, 32, 64), unit_rows(rng, 32, 64)
    mesh = _mesh(8)
    a = jax.device_put(jnp.asarray(zi, jnp.bfloat16), NamedSharding(mesh, P("data")))
    b = jax.device_put(jnp.asarray(zt, jnp.bfloat16), NamedSharding(mesh, P("data")))
    value = losses.softmax_loss(a, b, jnp.float32(2.0), mesh=mesh)
    ref, _ = softmax_loss_and_grads(np.asarray(a, np.float64), np.asarray(b, np.float64), 2.0)
    assert value.dtype == jnp.float32
    _close(value, ref, rtol=1e-5)


def test_indivisible_batch_and_unknown_impl_are_clear_errors():
    mesh = _mesh(8)
    z = jnp.ones((12, 4), jnp.float32)
    with pytest.raises(ValueError, match=r"B=12 is not divisible by the 8 devices"):
        losses.softmax_loss(z, z, jnp.float32(1.0), mesh=mesh)
    with pytest.raises(ValueError, match=r"impl must be one of"):
        losses.sigmoid_loss(z, z, jnp.float32(1.0), jnp.float32(0.0), impl="ringg")
    with pytest.raises(ValueError, match=r"shape \(B, d\)"):
        losses.softmax_loss(z, z[:, :2], jnp.float32(1.0))
