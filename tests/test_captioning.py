"""Captioning (CoCa): the next-token loss against float64, causality, config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from conftest import load_tiny_config
from reference import caption_loss_and_grads
from vlm_jax import session
from vlm_jax.errors import ConfigError
from vlm_jax.losses import captioning


def _tokens(rng, B, L, V):
    """Captions of 1..L tokens (ids 1..V-1), then 0-padding; some rows full."""
    tokens = rng.integers(1, V, (B, L))
    lengths = rng.integers(1, L + 1, B)
    lengths[::3] = L
    return np.where(np.arange(L)[None] < lengths[:, None], tokens, 0).astype(np.int32)


@pytest.mark.parametrize("n", (1, 2, 4, 8))
def test_caption_loss_matches_float64_reference_on_every_device_count(n):
    rng = np.random.default_rng(n)
    B, L, V = 16, 7, 11
    logits = rng.standard_normal((B, L, V)) * 3
    tokens = _tokens(rng, B, L, V)
    mesh = Mesh(np.asarray(jax.devices()[:n]), ("data",), axis_types=(AxisType.Auto,))
    sh = NamedSharding(mesh, P("data"))
    f = jax.jit(jax.value_and_grad(lambda z, t: captioning.caption_loss(*captioning.token_nll(z, t))))
    value, grad = f(jax.device_put(jnp.asarray(logits, jnp.float32), sh), jax.device_put(jnp.asarray(tokens), sh))
    ref, ref_grad = caption_loss_and_grads(logits, tokens)
    assert abs(float(value) - ref) <= 1e-6 * abs(ref)
    np.testing.assert_allclose(np.asarray(grad, np.float64), ref_grad, atol=1e-6 * np.abs(ref_grad).max())
    nll, count = captioning.token_nll(jnp.asarray(logits, jnp.float32), jnp.asarray(tokens))
    np.testing.assert_array_equal(np.asarray(count), (tokens != 0).sum(axis=1))  # every real token, the first included


def test_the_decoders_logits_at_l_depend_only_on_earlier_tokens(data_dir):
    cfg = load_tiny_config(data_dir, "configs/default.py:coca")
    run = session.setup(cfg)
    params = jax.jit(run.init_state)(jax.random.PRNGKey(0))["params"]
    rng = np.random.default_rng(0)
    L = cfg.model.text.max_len
    images = jnp.asarray(rng.standard_normal((2, cfg.data.image_size, cfg.data.image_size, 3)), jnp.float32)
    tokens = rng.integers(1, 20, (2, L)).astype(np.int32)
    logits = jax.jit(run.objective.logits)
    base = np.asarray(logits(params, images, jnp.asarray(tokens)))
    for cut in (1, L // 2, L - 1):
        changed = tokens.copy()
        changed[:, cut:] = rng.integers(1, 20, (2, L - cut))
        other = np.asarray(logits(params, images, jnp.asarray(changed)))
        # position l predicts token l from the tokens before it: up to the changed one, bit for bit
        np.testing.assert_array_equal(other[:, :cut + 1], base[:, :cut + 1])
        if cut + 1 < L:
            assert not np.allclose(other[:, cut + 1:], base[:, cut + 1:])
    # the image matters: another image changes every position's logits
    assert not np.allclose(np.asarray(logits(params, images[::-1], jnp.asarray(tokens)))[0], base[0])


def test_coca_refuses_a_bidirectional_text_tower(data_dir):
    with pytest.raises(ConfigError, match=r"config.model.text.causal: the captioning decoder"):
        session.setup(load_tiny_config(data_dir, "configs/default.py:coca", **{"model.text.causal": False}))


def test_greedy_captions_follow_the_teacher_forced_distribution(data_dir):
    """Each generated token is the argmax (padding excluded) of the logits the
    training loss uses at its position, given the tokens generated before it;
    after EOS a row is padding."""
    cfg = load_tiny_config(data_dir, "configs/default.py:coca")
    run = session.setup(cfg)
    params = jax.jit(run.init_state)(jax.random.PRNGKey(1))["params"]
    images = jnp.asarray(np.random.default_rng(0).standard_normal((4, cfg.data.image_size, cfg.data.image_size, 3)),
                         jnp.float32)
    logits_fn = jax.jit(run.objective.logits)
    first = np.asarray(logits_fn(params, images, jnp.zeros((4, cfg.model.text.max_len), jnp.int32)))[:, 0]
    eos = int(np.argsort(first[0])[-2])  # a token the first row is likely to produce early
    got = np.asarray(jax.jit(run.objective.captions, static_argnums=2)(params, images, eos))
    want = np.zeros_like(got)
    done = np.zeros(4, bool)
    for pos in range(got.shape[1]):
        logits = np.array(logits_fn(params, images, jnp.asarray(want)))[:, pos]
        logits[:, 0] = -np.inf
        nxt = np.where(done, 0, logits.argmax(axis=1))
        want[:, pos] = nxt
        done |= nxt == eos
    np.testing.assert_array_equal(got, want)
    assert (got != 0).any()


@pytest.mark.parametrize("module", ("decoder", "fusion"))
def test_the_cross_attention_stacks_remat_and_scan_to_the_same_values_and_gradients(module):
    from vlm_jax.models import decoder

    rng = np.random.default_rng(0)
    text = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32)
    image = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
    valid = jnp.asarray([[1, 1, 1, 0, 0], [1] * 5], bool)

    def make(**kw):
        if module == "decoder":
            m = decoder.CaptionDecoder(11, 2, 32, 2, **kw)
            return m, (lambda p: m.apply({"params": p}, text, image))
        m = decoder.FusionEncoder(2, 32, 2, **kw)
        return m, (lambda p: m.apply({"params": p}, text, valid, image))

    plain, f = make()
    args = (text, image) if module == "decoder" else (text, valid, image)
    params = plain.init(jax.random.PRNGKey(0), *args)["params"]
    loss = lambda fn: lambda p: jnp.sum(jnp.sin(fn(p)))  # noqa: E731
    want, want_g = jax.value_and_grad(loss(f))(params)
    _, f_remat = make(remat="full")
    got, got_g = jax.value_and_grad(loss(f_remat))(params)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(got_g), jax.tree_util.tree_leaves(want_g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    scanned, f_scan = make(scan=True)
    blocks = [params.pop(f"block{i}") for i in range(2)]
    stacked = {**params, "blocks": {"block": jax.tree_util.tree_map(lambda *x: jnp.stack(x), *blocks)}}
    assert jax.tree_util.tree_structure(stacked) == jax.tree_util.tree_structure(
        scanned.init(jax.random.PRNGKey(0), *args)["params"])
    got, got_g = jax.value_and_grad(loss(f_scan))(stacked)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    want_stacked = {k: v for k, v in want_g.items() if not k.startswith("block")}
    want_stacked["blocks"] = {"block": jax.tree_util.tree_map(lambda *x: jnp.stack(x), want_g["block0"],
                                                              want_g["block1"])}
    for a, b in zip(jax.tree_util.tree_leaves(got_g), jax.tree_util.tree_leaves(want_stacked)):
        # the loop sums in another order: float32 rounding of the leaf's scale, not of each element
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=max(1e-6, 1e-5 * float(np.max(np.abs(b)))))
