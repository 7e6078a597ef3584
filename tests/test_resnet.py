"""CLIP's modified ResNet tower: shapes, attention pool, convolution and
group norm against float64, no batch statistics, config checks, FLOP count."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import config as config_lib
from vlm_jax.errors import ConfigError
from vlm_jax.models import resnet


def _tiny(**kw):
    args = dict(layers=(1, 1), base_width=8, num_heads=2)
    args.update(kw)
    return resnet.ModifiedResNet(**args)


@pytest.mark.parametrize("layers,size,side", [((1,), 16, 4), ((1, 1), 32, 4), ((1, 2, 1), 32, 2)])
def test_stages_set_the_token_grid_and_widths(layers, size, side):
    m = _tiny(layers=layers)
    x = jnp.zeros((2, size, size, 3))
    params = m.init(jax.random.PRNGKey(0), x)
    pooled, tokens = m.apply(params, x)
    features = 8 * 4 * 2 ** (len(layers) - 1)
    assert m.width == features
    assert pooled.shape == (2, features) and tokens.shape == (2, side * side, features)
    assert params["params"]["attn_pool"]["pos_embed"].shape == (1, side * side + 1, features)
    out = _tiny(layers=layers, output_dim=24)
    assert out.width == 24
    assert out.apply(out.init(jax.random.PRNGKey(0), x), x)[0].shape == (2, 24)


def test_every_block_starts_as_the_identity_on_its_shortcut():
    """The last norm of each block starts at scale zero (as CLIP initialises
    bn3), so a block without a projection shortcut passes relu(x) through."""
    block = resnet.Bottleneck(planes=4)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 6, 16))
    params = block.init(jax.random.PRNGKey(0), x)
    np.testing.assert_allclose(block.apply(params, x), jax.nn.relu(x), rtol=0, atol=0)


def _attention_pool_reference(x, p, heads):
    """float64 NumPy: CLIP's AttentionPool2d read off the paper (all n + 1
    queries, then the first row kept), and the per-position value path."""
    x = np.asarray(x, np.float64)
    w = {k: (np.asarray(v["kernel"], np.float64), np.asarray(v["bias"], np.float64))
         for k, v in p.items() if k.endswith("_proj")}
    b, n, c = x.shape
    d = c // heads
    x = np.concatenate([x.mean(axis=1, keepdims=True), x], axis=1) + np.asarray(p["pos_embed"], np.float64)
    q, k, v = (x @ w[name][0] + w[name][1] for name in ("q_proj", "k_proj", "v_proj"))
    q, k, v = (t.reshape(b, n + 1, heads, d).transpose(0, 2, 1, 3) for t in (q, k, v))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    out = (a @ v).transpose(0, 2, 1, 3).reshape(b, n + 1, c)
    pooled = out[:, 0] @ w["c_proj"][0] + w["c_proj"][1]
    v_flat = v.transpose(0, 2, 1, 3).reshape(b, n + 1, c)
    tokens = v_flat[:, 1:] @ w["c_proj"][0] + w["c_proj"][1]
    return pooled, tokens


def test_attention_pool_matches_a_float64_reference():
    pool = resnet.AttentionPool(num_heads=4, out_dim=12)
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 9, 16))
    params = pool.init(jax.random.PRNGKey(0), x)
    # non-zero biases, so that a dropped bias would show
    params = jax.tree_util.tree_map(lambda a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(3), a.shape), params)
    pooled, tokens = pool.apply(params, x)
    ref_pooled, ref_tokens = _attention_pool_reference(x, params["params"], 4)
    np.testing.assert_allclose(pooled, ref_pooled, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(tokens, ref_tokens, rtol=2e-5, atol=2e-6)


def _conv_reference(x, kernel, stride):
    """float64 NumPy k × k convolution, zero padding k // 2, NHWC · HWIO."""
    k, p = kernel.shape[0], kernel.shape[0] // 2
    b, h, w, _ = x.shape
    ho, wo = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    windows = lambda i, j: xp[:, i:i + (ho - 1) * stride + 1:stride, j:j + (wo - 1) * stride + 1:stride]
    out = sum(windows(i, j) @ kernel[i, j] for i in range(k) for j in range(k))
    return out, windows


@pytest.mark.parametrize("k,stride,side", [(3, 1, 6), (3, 2, 8), (3, 2, 7), (1, 1, 5)])
def test_conv_matches_a_float64_reference_in_value_and_gradient(k, stride, side):
    """The convolution whose kernel gradient is a matrix product: its output,
    its kernel gradient (the windows of x against the output's cotangent) and
    its input gradient (the adjoint: <dx, d> = <conv(d), dy> for any d)."""
    conv = resnet.Conv(5, k, stride)
    x = jax.random.normal(jax.random.PRNGKey(10), (3, side, side, 4))
    params = conv.init(jax.random.PRNGKey(0), x)
    kernel = params["params"]["kernel"]
    assert kernel.shape == (k, k, 4, 5)
    assert jnp.array_equal(kernel, nn.Conv(5, (k, k), use_bias=False).init(jax.random.PRNGKey(0), x)["params"]["kernel"])
    x64, kernel64 = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    ref, windows = _conv_reference(x64, kernel64, stride)
    np.testing.assert_allclose(conv.apply(params, x), ref, rtol=1e-5, atol=1e-5)
    dy = jax.random.normal(jax.random.PRNGKey(11), ref.shape)
    dx, dk = jax.grad(lambda x, kern: jnp.vdot(conv.apply({"params": {"kernel": kern}}, x), dy), argnums=(0, 1))(x, kernel)
    dy64 = np.asarray(dy, np.float64)
    ref_dk = np.stack([np.einsum("bhwc,bhwo->co", windows(i, j), dy64) for i in range(k) for j in range(k)])
    np.testing.assert_allclose(dk, ref_dk.reshape(kernel.shape), rtol=1e-5, atol=1e-4)
    d = np.asarray(jax.random.normal(jax.random.PRNGKey(12), x.shape), np.float64)
    np.testing.assert_allclose(np.vdot(np.asarray(dx, np.float64), d), np.vdot(_conv_reference(d, kernel64, stride)[0], dy64),
                               rtol=1e-5)


def _group_norm_reference(x, scale, bias, groups, eps=1e-5):
    """float64 NumPy group normalisation of an NHWC map (Wu and He 2018)."""
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(b, h, w, c) * scale + bias


@pytest.mark.parametrize("channels,groups", [(16, 16), (32, 8), (12, 1)])
def test_group_norm_matches_a_float64_reference_and_flax_in_value_and_gradient(channels, groups):
    norm = resnet.GroupNorm(num_groups=groups)
    x = 3.0 + jax.random.normal(jax.random.PRNGKey(5), (3, 5, 4, channels))  # a mean far from 0
    scale, bias = (jax.random.normal(jax.random.PRNGKey(k), (channels,)) for k in (6, 7))
    params = {"params": {"scale": scale, "bias": bias}}
    assert jax.tree_util.tree_map(jnp.shape, norm.init(jax.random.PRNGKey(0), x)) == \
        jax.tree_util.tree_map(jnp.shape, params)
    args = [np.asarray(a, np.float64) for a in (x, scale, bias)]
    np.testing.assert_allclose(norm.apply(params, x), _group_norm_reference(*args, groups), rtol=1e-5, atol=1e-5)
    probe = jax.random.normal(jax.random.PRNGKey(8), x.shape)

    def grads(module):
        f = lambda x, s, b: jnp.vdot(module.apply({"params": {"scale": s, "bias": b}}, x), probe)
        return jax.grad(f, argnums=(0, 1, 2))(x, scale, bias)

    got, flax_grads = grads(norm), grads(nn.GroupNorm(num_groups=groups, epsilon=1e-5))
    ref = lambda *a: float(np.vdot(_group_norm_reference(*a, groups), np.asarray(probe, np.float64)))
    eps = 1e-6  # central differences of the float64 reference along a random direction per argument
    for i, (g, g_flax) in enumerate(zip(got, flax_grads)):
        d = np.asarray(jax.random.normal(jax.random.PRNGKey(9 + i), args[i].shape), np.float64)
        plus, minus = list(args), list(args)
        plus[i], minus[i] = args[i] + eps * d, args[i] - eps * d
        np.testing.assert_allclose(np.vdot(np.asarray(g, np.float64), d), (ref(*plus) - ref(*minus)) / (2 * eps),
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(g, g_flax, rtol=1e-4, atol=1e-4)


def test_an_example_does_not_depend_on_the_rest_of_its_batch():
    """GroupNorm has no batch statistics: each example's outputs are the same
    alone, in any batch, on any split of the batch over devices."""
    m = _tiny()
    x = jax.random.uniform(jax.random.PRNGKey(4), (4, 32, 32, 3), minval=-1, maxval=1)
    params = m.init(jax.random.PRNGKey(0), x)
    pooled, tokens = m.apply(params, x)
    for i in range(4):
        p1, t1 = m.apply(params, x[i:i + 1])
        np.testing.assert_allclose(p1[0], pooled[i], rtol=1e-4, atol=1e-5)  # float32 conv sums in another order
        np.testing.assert_allclose(t1[0], tokens[i], rtol=1e-4, atol=1e-5)


def _config(**fields):
    return config_lib.load_config("configs/default.py", ["model.image.tower=resnet"] +
                                  [f"{k}={v}" for k, v in fields.items()])


@pytest.mark.parametrize("fields,match", [
    ({"data.image_size": 36, "model.image.layers": "(1, 1)"}, "model.image.layers.*multiple"),
    ({"model.image.layers": "()"}, "model.image.layers"),
    ({"model.image.base_width": 7}, "model.image.base_width"),
    ({"model.image.num_heads": 3}, "model.image.num_heads"),
    ({"model.image.pixel_mean": "(0.5, 0.5, 0.5)"}, "model.image.pixel_std"),
])
def test_bad_resnet_fields_are_config_errors_that_name_the_field(fields, match):
    with pytest.raises(ConfigError, match=match):
        _config(**fields)


@pytest.mark.parametrize("fields", [{}, {"model.image.layers": "(2, 1, 1)", "model.image.output_dim": 48}])
def test_analytic_flops_agree_with_xla(fields):
    c = _config(**fields)
    m = resnet.ModifiedResNet.from_config(c.model.image, c.model, 100)
    x = jnp.zeros((1, c.data.image_size, c.data.image_size, 3))
    params = jax.eval_shape(m.init, jax.random.PRNGKey(0), x)
    cost = jax.jit(m.apply).lower(params, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops, width = resnet.ModifiedResNet.forward_flops(c)
    assert width == m.width
    # XLA also counts the norms', activations' and pools' elementwise work (about 3 % here)
    assert 0 < 1 - flops / cost["flops"] < 0.05, (flops, cost["flops"])


def test_space_to_depth_is_a_lossless_rearrangement_before_the_stem():
    """s = 2: a 2s-times larger image on the same grid; the first convolution
    sees each 2 × 2 block's 12 values in (row, column, channel) order."""
    m = _tiny(space_to_depth=2)
    x = jax.random.uniform(jax.random.PRNGKey(5), (2, 64, 64, 3), minval=-1, maxval=1)
    params = m.init(jax.random.PRNGKey(0), x)
    assert params["params"]["stem_conv0"]["kernel"].shape == (3, 3, 12, 4)
    pooled, tokens = m.apply(params, x)
    assert tokens.shape == (2, 16, 64)  # 64 px / (2 · 8): 4 x 4
    # the same as the plain tower on the rearranged image, with a 12-channel input
    plain = _tiny()
    y = np.asarray(x).reshape(2, 32, 2, 32, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 32, 32, 12)
    np.testing.assert_allclose(plain.apply(params, jnp.asarray(y))[0], pooled, rtol=1e-5, atol=1e-6)
    assert y[0, 3, 5, 7] == x[0, 6 + 1, 10 + 0, 1]  # channel 7 = row 1, column 0, channel 1
