"""Per-pair weights in the softmax and sigmoid engines: equal to float64
references on 1, 2, 4 and 8 devices; unit weights are the unweighted loss;
a zero weight removes the pair exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from reference import region_word_loss_and_grads, unit_rows, weighted_softmax_loss_and_grads
from vlm_jax import losses

IMPLS = [("all_gather", None), ("ring", None), ("tiled", 2)]


def _mesh(n):
    return Mesh(np.asarray(jax.devices()[:n]), ("data",), axis_types=(AxisType.Auto,))


def _close(actual, expected, rtol=1e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert np.abs(actual - expected).max() <= rtol * max(np.abs(expected).max(), 1e-30), (actual, expected)


def _case(seed, B=16, d=8):
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.2, 2.0, B)
    w[rng.choice(B, 3, replace=False)] = 0.0  # some pairs removed
    return unit_rows(rng, B, d), unit_rows(rng, B, d), w


def _value_and_grads(kind, zi, zt, w, impl, tile, mesh):
    put = (lambda x: jax.device_put(jnp.asarray(x, jnp.float32), NamedSharding(mesh, P("data")))) if mesh else \
        (lambda x: jnp.asarray(x, jnp.float32))
    if kind == "softmax":
        f = lambda a, b, lt: losses.softmax_loss(a, b, lt, impl=impl, mesh=mesh, tile=tile,  # noqa: E731
                                                 weights=None if w is None else put(w))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(put(zi), put(zt), jnp.float32(2.0))
    f = lambda a, b, lt, bb: losses.sigmoid_loss(a, b, lt, bb, impl=impl, mesh=mesh, tile=tile,  # noqa: E731
                                                 weights=None if w is None else put(w))
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(put(zi), put(zt), jnp.float32(2.0), jnp.float32(-3.0))


def _reference(kind, zi, zt, w):
    if kind == "softmax":
        ref, g = weighted_softmax_loss_and_grads(zi, zt, w, 2.0)
        return ref, [g["zimg"], g["ztxt"], g["log_t"]]
    keys = np.arange(len(w))[:, None]
    ref, g = region_word_loss_and_grads(zi[:, None], keys, w[:, None], zt[:, None], keys, w[:, None], 2.0, -3.0)
    return ref, [g["regions"][:, 0], g["phrases"][:, 0], g["log_t"], g["bias"]]


@pytest.mark.parametrize("n", (1, 2, 4, 8))
@pytest.mark.parametrize("impl,tile", IMPLS)
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_weighted_losses_match_float64_references(kind, impl, tile, n):
    zi, zt, w = _case(n)
    value, grads = _value_and_grads(kind, zi, zt, w, impl, tile, _mesh(n))
    ref, ref_grads = _reference(kind, zi, zt, w)
    _close(value, ref)
    for got, want in zip(grads, ref_grads):
        _close(got, want)


@pytest.mark.parametrize("impl,tile", IMPLS)
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_unit_weights_are_the_unweighted_loss(kind, impl, tile):
    zi, zt, _ = _case(7)
    plain, plain_grads = _value_and_grads(kind, zi, zt, None, impl, tile, _mesh(4))
    unit, unit_grads = _value_and_grads(kind, zi, zt, np.ones(len(zi)), impl, tile, _mesh(4))
    _close(unit, plain, rtol=1e-6)
    for a, b in zip(unit_grads, plain_grads):
        _close(a, b, rtol=1e-6)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_a_zero_weight_removes_the_pair(kind):
    zi, zt, _ = _case(3)
    w = np.ones(len(zi))
    w[[2, 9]] = 0.0
    keep = w > 0
    weighted, _ = _value_and_grads(kind, zi, zt, w, "ring", None, _mesh(2))
    plain, _ = _value_and_grads(kind, zi[keep], zt[keep], None, "all_gather", None, None)
    _close(weighted, plain, rtol=1e-6)
