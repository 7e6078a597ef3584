"""ALBEF: image–text matching with hard negatives, masked language modelling,
the fusion encoder, against float64 references on 1, 2, 4 and 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from conftest import load_tiny_config
from reference import caption_loss_and_grads, hard_negative_draws, itm_bilinear_loss_and_grads
from vlm_jax import session, step as step_lib
from vlm_jax.errors import ConfigError
from vlm_jax.losses import captioning, matching
from vlm_jax.models import decoder
from vlm_jax.objectives import albef


def _mesh(n):
    return Mesh(np.asarray(jax.devices()[:n]), ("data",), axis_types=(AxisType.Auto,))


def _inputs(seed, B=16, n_img=3, L=5, d=4, V=9):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((2, B, d))
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    sim = z[0] @ z[1].T
    tokens = rng.integers(1, V, (B, L))
    tokens[:, 3:] *= rng.random((B, L - 3)) < 0.5  # some padding at the end
    tokens[7], tokens[11], tokens[12] = tokens[3], tokens[10], tokens[10]  # duplicate captions
    u = rng.random((B, 2))
    return dict(sim=sim, log_t=np.log(5.0), tokens=tokens.astype(np.int32), u=u,
                img=rng.standard_normal((B, n_img, d)), txt=rng.standard_normal((B, L, d)),
                w=rng.standard_normal((d, d)))


def _bilinear_itm(sim, log_t, tokens, u, img, txt, w):
    mask = (tokens != 0).astype(jnp.float32)
    a = img.mean(1)
    c = (txt * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)

    def pair_logits(i, j):
        s = jnp.einsum("pd,de,pe->p", a[i], w, c[j])
        return jnp.stack([jnp.zeros_like(s), s], axis=1)

    return matching.itm_loss(sim, log_t, tokens, u, pair_logits)[0]


@pytest.mark.parametrize("n", (1, 2, 4, 8))
def test_itm_loss_and_gradients_match_float64_on_every_device_count(n):
    x = _inputs(n)
    sh, rep = NamedSharding(_mesh(n), P("data")), NamedSharding(_mesh(n), P())
    f = jax.jit(jax.value_and_grad(_bilinear_itm, argnums=(4, 5, 6)))
    put = lambda v, s=sh: jax.device_put(jnp.asarray(v, jnp.int32 if v.dtype.kind == "i" else jnp.float32), s)  # noqa: E731
    value, grads = f(put(x["sim"]), jnp.float32(x["log_t"]), put(x["tokens"]), put(x["u"]), put(x["img"]),
                     put(x["txt"]), put(x["w"], rep))
    ref, ref_grads, _ = itm_bilinear_loss_and_grads(x["sim"], x["log_t"], x["tokens"], x["u"], x["img"], x["txt"],
                                                    x["w"])
    assert abs(float(value) - ref) <= 1e-5 * abs(ref)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g, np.float64), r, atol=1e-5 * np.abs(r).max())


def test_hard_negatives_are_the_same_on_1_and_8_devices_and_never_a_positive_or_duplicate():
    x = _inputs(0, B=64, L=6)
    args = (jnp.asarray(x["sim"], jnp.float32), jnp.float32(x["log_t"]))
    tokens, u = jnp.asarray(x["tokens"]), jnp.asarray(x["u"], jnp.float32)
    f = jax.jit(lambda s, lt, t, uu: matching.hard_negatives(s, lt, matching.same_caption(t), uu))
    one = jax.tree_util.tree_map(np.asarray, f(*args, tokens, u))
    sh = NamedSharding(_mesh(8), P("data"))
    eight = jax.tree_util.tree_map(np.asarray, f(jax.device_put(args[0], sh), args[1], jax.device_put(tokens, sh),
                                                 jax.device_put(u, sh)))
    for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(eight)):
        np.testing.assert_array_equal(a, b)
    (neg_t, ok_t), (neg_i, ok_i) = one
    assert ok_t.all() and ok_i.all()
    same = (x["tokens"][:, None] == x["tokens"][None]).all(-1)
    rows = np.arange(64)
    assert not same[rows, neg_t].any() and not same[neg_i, rows].any()  # not the positive, nor its duplicate
    (rt, _), (ri, _) = hard_negative_draws(x["sim"], x["log_t"], x["tokens"], x["u"])
    np.testing.assert_array_equal(neg_t, rt)
    np.testing.assert_array_equal(neg_i, ri)


def test_the_draws_follow_the_similarity_distribution():
    """At u on a grid of K quantiles, column j is drawn K·p_j times (± 1)."""
    rng = np.random.default_rng(3)
    B, K = 12, 4000
    logits = rng.standard_normal(B) * 2
    excluded = np.zeros(B, bool)
    excluded[[0, 5]] = True
    u = (np.arange(K) + 0.5) / K
    idx, ok = jax.jit(matching.sample_rows)(jnp.tile(jnp.asarray(logits, jnp.float32), (K, 1)),
                                            jnp.tile(jnp.asarray(excluded), (K, 1)), jnp.asarray(u, jnp.float32))
    assert np.asarray(ok).all()
    p = np.where(excluded, 0.0, np.exp(logits - logits.max()))
    p /= p.sum()
    counts = np.bincount(np.asarray(idx), minlength=B)
    assert counts[excluded].sum() == 0
    assert np.abs(counts - K * p).max() <= 1.0 + 1e-6 * K


def test_a_row_of_duplicates_has_no_negative_and_leaves_the_loss():
    x = _inputs(1)
    x["tokens"][:] = x["tokens"][0]  # every caption the same: no valid negative anywhere
    value = _bilinear_itm(*(jnp.asarray(x[k]) for k in ("sim", "log_t", "tokens", "u", "img", "txt", "w")))
    ref, _, (_, ok_t, _, ok_i) = itm_bilinear_loss_and_grads(x["sim"], x["log_t"], x["tokens"], x["u"], x["img"],
                                                             x["txt"], x["w"])
    assert not ok_t.any() and not ok_i.any()
    assert abs(float(value) - ref) <= 1e-5 * abs(ref)  # the mean over the 16 positives only


@pytest.mark.parametrize("n", (1, 2, 4, 8))
def test_mlm_loss_matches_float64_on_every_device_count(n):
    """L_MLM is the mean NLL over the chosen tokens: the captioning formula
    with targets that are zero (ignored) away from the chosen positions."""
    rng = np.random.default_rng(10 + n)
    B, L, V = 16, 9, 13
    logits = rng.standard_normal((B, L, V)) * 3
    tokens = rng.integers(1, V, (B, L)).astype(np.int32)
    targets = np.stack([albef.mask_caption(t, rng, 0.15, 1, V)[2] for t in tokens])
    sh = NamedSharding(_mesh(n), P("data"))
    f = jax.jit(jax.value_and_grad(lambda z, t: captioning.caption_loss(*captioning.token_nll(z, t))))
    value, grad = f(jax.device_put(jnp.asarray(logits, jnp.float32), sh), jax.device_put(jnp.asarray(targets), sh))
    ref, ref_grad = caption_loss_and_grads(logits, targets)
    assert abs(float(value) - ref) <= 1e-6 * abs(ref)
    np.testing.assert_allclose(np.asarray(grad, np.float64), ref_grad, atol=1e-6 * np.abs(ref_grad).max())


def test_mask_caption_chooses_real_tokens_in_bert_proportions():
    rng = np.random.default_rng(0)
    fates = np.zeros(3)
    for _ in range(3000):
        n = int(rng.integers(1, 20))
        tokens = np.zeros(20, np.int32)
        tokens[:n] = rng.integers(1, 50, n)
        inputs, where, targets = albef.mask_caption(tokens, rng, 0.15, 50, 60)  # replacements in [50, 60)
        chosen = targets != 0
        assert chosen.sum() == max(1, round(0.15 * n)) and not chosen[n:].any()
        np.testing.assert_array_equal(targets[chosen], tokens[chosen])
        assert not (where & ~chosen).any() and (inputs[~chosen] == tokens[~chosen]).all()
        swapped = chosen & (inputs >= 50)
        fates += [where.sum(), swapped.sum(), (chosen & ~where & ~swapped).sum()]
    shares = fates / fates.sum()
    np.testing.assert_allclose(shares, [0.8, 0.1, 0.1], atol=0.02)
    # a pure function of the generator's state
    a = albef.mask_caption(tokens, np.random.default_rng(5), 0.15, 1, 50)
    b = albef.mask_caption(tokens, np.random.default_rng(5), 0.15, 1, 50)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_the_fusion_encoder_ignores_padding_and_reads_the_image():
    rng = np.random.default_rng(0)
    enc = decoder.FusionEncoder(depth=2, mlp_dim=16, num_heads=2)
    text = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
    valid = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    image = jnp.asarray(rng.standard_normal((2, 3, 6)), jnp.float32)
    params = enc.init(jax.random.PRNGKey(0), text, valid, image)
    out = np.asarray(enc.apply(params, text, valid, image))
    assert out.shape == (2, 6, 8)
    other = np.asarray(enc.apply(params, text.at[0, 3:].set(7.0), valid, image))
    np.testing.assert_array_equal(other[0, :4], out[0, :4])  # the query and the real tokens: bit for bit
    assert not np.allclose(np.asarray(enc.apply(params, text, valid, image[::-1]))[0, 0], out[0, 0])


def test_the_mask_vector_replaces_the_token_it_covers(data_dir):
    cfg = load_tiny_config(data_dir, "configs/default.py:albef")
    run = session.setup(cfg)
    params = jax.jit(run.init_state)(jax.random.PRNGKey(0))["params"]
    tokens = jnp.asarray([[5, 6, 7, 8, 0, 0] + [0] * (cfg.model.text.max_len - 6)], jnp.int32)
    where = tokens == 6
    text = jax.jit(lambda p, t: run.model.apply({"params": p}, t, (where, p["mask_embed"]),
                                                 method=lambda m, t, r: m.text(t, r)[1]))
    a, b = np.asarray(text(params, tokens)), np.asarray(text(params, tokens.at[0, 1].set(9)))
    np.testing.assert_array_equal(a, b)  # the id under the mask is not read
    plain = np.asarray(jax.jit(lambda p, t: run.model.apply({"params": p}, t, method=lambda m, t: m.text(t)[1]))(
        params, tokens))
    assert not np.allclose(plain, a)


def test_albef_loss_is_the_same_on_1_and_8_devices(data_dir):
    """The objective end to end (sampler, gathered pairs, fusion, MLM): the
    same global batch gives the same loss and metrics on 1 and on 8 devices."""
    from test_accum import _setup_and_batch

    results = {}
    for n in (1, 8):
        cfg, run, params, batch = _setup_and_batch(data_dir, "configs/default.py:albef", **{"mesh.data": n})
        (loss, metrics), _ = jax.jit(step_lib.make_grad_fn(run.objective, run.mesh, 1))(params, batch)
        results[n] = (float(loss), {k: float(v) for k, v in metrics.items()})
    assert results[1][0] == pytest.approx(results[8][0], rel=1e-5)
    for k, v in results[1][1].items():
        assert v == pytest.approx(results[8][1][k], rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("extra,match", [({"loss.mlm_prob": 0.0}, "config.loss.mlm_prob"),
                                         ({"loss.fusion_depth": 0}, "config.loss.fusion_depth"),
                                         ({"loss.itm_weight": -1.0}, "config.loss.itm_weight"),
                                         ({"loss.contrastive_weight": 0.0, "loss.itm_weight": 0.0,
                                           "loss.mlm_weight": 0.0}, "all 0: nothing to train")])
def test_albef_config_errors_name_the_field(data_dir, extra, match):
    with pytest.raises(ConfigError, match=match):
        session.setup(load_tiny_config(data_dir, "configs/default.py:albef", **extra))
