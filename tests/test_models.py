"""Towers and the two-tower model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import collectives
from vlm_jax.models import towers


def _vit(**kw):
    args = dict(patch_size=4, width=32, depth=1, mlp_dim=64, num_heads=2)
    args.update(kw)
    return towers.ViT(**args)


def _text(**kw):
    args = dict(vocab_size=50, max_len=10, width=32, depth=1, mlp_dim=64, num_heads=2)
    args.update(kw)
    return towers.TextTransformer(**args)


@pytest.mark.parametrize("pool", ["cls", "gap", "map"])
@pytest.mark.parametrize("posemb", ["learn", "sincos2d"])
def test_vit_pools_to_width(pool, posemb):
    m = _vit(pool=pool, posemb=posemb)
    x = jnp.ones((3, 16, 16, 3))
    params = m.init(jax.random.PRNGKey(0), x)
    pooled, tokens = m.apply(params, x)
    assert pooled.shape == (3, 32)
    assert tokens.shape == (3, 16, 32)  # 16 patches; a class token is not a patch token
    assert ("pos_embed" in params["params"]) == (posemb == "learn")


@pytest.mark.parametrize("stem", [(8,), (8, 16)])
def test_a_conv_stem_keeps_the_tokens_and_shrinks_the_patch_embedding(stem):
    m = _vit(stem=stem)
    x = jnp.zeros((2, 16, 16, 3))
    params = m.init(jax.random.PRNGKey(0), x)
    pooled, tokens = m.apply(params, x)
    assert pooled.shape == (2, 32) and tokens.shape == (2, 16, 32)  # (16 / patch 4)² tokens, as without a stem
    p = params["params"]
    assert [p[f"stem_conv{i}"]["kernel"].shape[-1] for i in range(len(stem))] == list(stem)
    assert p["patch_embed"]["kernel"].shape[:2] == (4 >> len(stem),) * 2  # each stem conv halves the grid


def test_a_stem_that_does_not_divide_the_patch_is_a_config_error():
    from vlm_jax.config import ConfigError, base_config, check_config

    c = base_config()
    c.model.image.stem = (8, 16, 32)  # 8 does not divide patch_size 4
    with pytest.raises(ConfigError, match=r"config.model.image.stem: 3 stride-2 convolutions need patch_size"):
        check_config(c)


@pytest.mark.parametrize("pool", ["eos", "last", "mean"])
@pytest.mark.parametrize("causal", [True, False])
def test_text_tower_is_invariant_to_trailing_padding_where_it_should_be(pool, causal):
    m = _text(pool=pool, causal=causal)
    short = jnp.array([[5, 6, 7, 1, 0, 0, 0, 0]])
    longer = jnp.array([[5, 6, 7, 1, 0, 0, 0, 0, 0, 0]])
    params = m.init(jax.random.PRNGKey(0), short)
    a, b = m.apply(params, short)[0], m.apply(params, longer)[0]
    assert a.shape == (1, 32)
    if pool in ("eos", "mean"):  # padding is masked out of attention and pooling
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pool", ["eos", "argmax"])
def test_text_pooling_stays_on_the_device_that_holds_the_rows(pool):
    """The pooled token of each row is x[i, index[i]] exactly, and a tower whose
    batch is split over 4 devices pools (and back-propagates) with no
    collective: indexing with (arange(B), index) made the partitioner
    all-gather the indices and all-reduce a (B, width) result."""
    m = _text(pool=pool, causal=True)
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 40, (8, 10)).astype(np.int32)
    tokens[np.arange(8), rng.integers(3, 10, 8)] = 49  # the EOT id, the largest, at a row-dependent place
    tokens[np.arange(10)[None] > np.argmax(tokens, axis=1)[:, None]] = 0  # padding after it
    params = m.init(jax.random.PRNGKey(0), tokens)
    pooled, x = m.apply(params, tokens)
    index = np.argmax(tokens, axis=1) if pool == "argmax" else (tokens != 0).sum(axis=1) - 1
    np.testing.assert_array_equal(pooled, np.asarray(x)[np.arange(8), index])

    # the parameter gradients are summed over devices: all-reduces of the parameters' shapes only
    found = collectives(lambda p, t: jnp.sum(m.apply(p, t)[0] ** 2), params, tokens)
    assert all(op == "all-reduce" and "[8," not in shape for op, shape in found), found


def test_causal_eos_embedding_ignores_nothing_before_eos():
    m = _text(pool="eos", causal=True)
    a = jnp.array([[5, 6, 7, 1, 0, 0]])
    b = jnp.array([[9, 6, 7, 1, 0, 0]])
    params = m.init(jax.random.PRNGKey(0), a)
    assert not np.allclose(m.apply(params, a)[0], m.apply(params, b)[0])


def test_two_tower_outputs_unit_embeddings_and_tokens():
    model = towers.TwoTower(_vit(), _text(), embed_dim=16)
    images, tokens = jnp.ones((4, 16, 16, 3)), jnp.ones((4, 10), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), images, tokens)
    zi, zt = model.apply(params, images, tokens)
    assert zi.shape == zt.shape == (4, 16)
    np.testing.assert_allclose(jnp.linalg.norm(zi, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(zt, axis=1), 1.0, rtol=1e-5)
    img_tok = model.apply(params, images, method=towers.TwoTower.encode_image_tokens)
    txt_tok, mask = model.apply(params, tokens, method=towers.TwoTower.encode_text_tokens)
    assert img_tok.shape == (4, 16, 16) and txt_tok.shape == (4, 10, 16) and mask.shape == (4, 10)
    np.testing.assert_allclose(jnp.linalg.norm(img_tok, axis=-1), 1.0, rtol=1e-5)
    pooled, _ = model.apply(params, images, method=towers.TwoTower.image_features)
    assert pooled.shape == (4, 32)  # the image tower's width, before projection
    assert set(params["params"]) == {"image", "text", "img_proj", "txt_proj"}  # nothing of any objective


def test_published_vit_b16_image_tower_size():
    """ViT-B/16 at 224 px with a class token: 85.8 M parameters before any head."""
    w, depth, mlp, heads = towers.VIT_SIZES["B"]
    m = towers.ViT(16, w, depth, mlp, heads, pool="cls")
    shapes = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.ones((1, 224, 224, 3)))
    n = sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))
    assert abs(n - 85.8e6) / 85.8e6 < 0.005, n


def test_token_offset_and_pad_id_are_what_the_embedding_sees():
    """token_offset=1 on the pipeline's shifted ids equals the tower on the
    tokenizer's own ids; pad_id is what padding positions embed (with padding
    attended to, SigLIP's way, it changes the output)."""
    own = np.array([[5, 9, 0, 3, 0, 0], [7, 1, 2, 8, 6, 4]], np.int32)  # id 0 is a real token here
    shifted = np.where(np.arange(6)[None] < np.array([[4], [6]]), own + 1, 0)  # the pipeline's: +1, then 0-padding
    kw = dict(vocab_size=10, max_len=6, width=16, depth=1, mlp_dim=32, num_heads=2, causal=True, mask_padding=False)
    plain = towers.TextTransformer(pool="first", **kw)
    params = plain.init(jax.random.PRNGKey(0), jnp.asarray(own))
    padded_own = np.where(shifted == 0, 0, own)  # what the tokenizer's own pipeline gives: padding as id 0
    a = plain.apply(params, jnp.asarray(padded_own))[1]
    b = towers.TextTransformer(pool="first", token_offset=1, **kw).apply(params, jnp.asarray(shifted))[1]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bidir = dict(kw, causal=False)
    c = towers.TextTransformer(pool="last", **bidir).apply(params, jnp.asarray(shifted))[0]
    d = towers.TextTransformer(pool="last", pad_id=1, **bidir).apply(params, jnp.asarray(shifted))[0]
    assert not np.allclose(np.asarray(c[0]), np.asarray(d[0]))  # the row with padding
    np.testing.assert_array_equal(np.asarray(c[1]), np.asarray(d[1]))  # the row without


def test_exact_gelu_is_the_erf_form_in_values_and_gradient():
    from scipy.special import erf

    x = np.linspace(-9.0, 9.0, 4001, dtype=np.float32)
    x64 = x.astype(np.float64)
    want = 0.5 * x64 * (1.0 + erf(x64 / np.sqrt(2.0)))
    dwant = 0.5 * (1.0 + erf(x64 / np.sqrt(2.0))) + x64 * np.exp(-0.5 * x64**2) / np.sqrt(2.0 * np.pi)
    gelu = towers.ACTIVATIONS["gelu"]
    got = np.asarray(gelu(jnp.asarray(x)), np.float64)
    dgot = np.asarray(jax.vmap(jax.grad(gelu))(jnp.asarray(x)), np.float64)
    assert np.max(np.abs(got - want) / np.maximum(1.0, np.abs(x64))) < 2e-6
    np.testing.assert_allclose(dgot, dwant, rtol=0, atol=2e-6)
    # torch.nn.GELU's formula, rounding for rounding: x·0.5·(1 + erf(x/√2)) on the same erf.
    xs = jnp.asarray(x)
    torch_form = xs * 0.5 * (1.0 + jax.lax.erf(xs * np.float32(np.sqrt(0.5))))
    np.testing.assert_array_equal(np.asarray(gelu(xs)), np.asarray(torch_form))
    assert gelu(jnp.ones(4, jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("lhs, rhs, dims", [
    ((3, 5, 8), (8, 2, 4), (((2,), (0,)), ((), ()))),  # q, k, v: (B, n, width) · (width, heads, head_dim)
    ((3, 5, 2, 4), (2, 4, 8), (((2, 3), (0, 1)), ((), ()))),  # output: (B, n, heads, head_dim) · (heads, head_dim, w)
    ((3, 5, 8), (3, 8, 4), (((2,), (1,)), ((0,), (0,)))),  # a batched contraction: lax.dot_general's own path
])
def test_a_projection_as_one_2d_matmul_is_dot_general_in_values_and_gradients(lhs, rhs, dims):
    a = jax.random.normal(jax.random.PRNGKey(0), lhs)
    b = jax.random.normal(jax.random.PRNGKey(1), rhs)
    want = jax.lax.dot_general(a, b, dims)
    got = towers.matmul_2d(a, b, dims)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    ct = jax.random.normal(jax.random.PRNGKey(2), want.shape)
    g_want = jax.vjp(lambda a, b: jax.lax.dot_general(a, b, dims), a, b)[1](ct)
    g_got = jax.vjp(lambda a, b: towers.matmul_2d(a, b, dims), a, b)[1](ct)
    for x, y in zip(g_got, g_want):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_2d_projections_keep_the_towers_parameters_and_function(scan):
    """config.model.projections_2d: the same parameter tree and initial values, the same outputs and
    gradients (to rounding), in both towers, scanned or not (incremental decoding: test_generate)."""
    images, tokens = jnp.linspace(-1, 1, 2 * 16 * 16 * 3).reshape(2, 16, 16, 3), jnp.arange(1, 21).reshape(2, 10)
    for make, x in ((lambda **k: _vit(pool="map", depth=2, **k), images), (lambda **k: _text(depth=2, **k), tokens)):
        plain, flat = make(scan=scan), make(scan=scan, projections_2d=True)
        params = plain.init(jax.random.PRNGKey(0), x)
        flat_params = flat.init(jax.random.PRNGKey(0), x)
        assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params, flat_params)))
        loss = lambda m: lambda p: jnp.sum(jnp.sin(m.apply(p, x)[0]))  # noqa: E731
        np.testing.assert_allclose(loss(flat)(params), loss(plain)(params), rtol=1e-5)
        g_plain, g_flat = jax.grad(loss(plain))(params), jax.grad(loss(flat))(params)
        for a, b in zip(jax.tree.leaves(g_flat), jax.tree.leaves(g_plain)):  # float32 rounding of each leaf's scale
            np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * max(1.0, float(np.max(np.abs(b)))))
