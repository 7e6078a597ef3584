"""Generation: beam search against exhaustive search, and CoCa's KV-cached
decoding against the teacher-forced logits the loss uses."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_tiny_config
from vlm_jax import session
from vlm_jax.models import generate

V, L, EOS = 5, 4, 4  # ids 1..4 are tokens, 0 is padding, 4 ends a sequence


def _markov(seed):
    """A toy model: log-probs of the token at position p given the one before."""
    rng = np.random.default_rng(seed)
    table = jax.nn.log_softmax(jnp.asarray(rng.standard_normal((2, L, V, V)) * 2, jnp.float32), axis=-1)
    first = lambda cache: (table[:, 0, 0], cache)  # noqa: E731  (two examples, one row each)

    def step(cache, tokens, pos):
        rows = cache["example"]
        return table[rows, pos, tokens], cache

    reorder = lambda cache, rows: generate.take_rows(cache, rows)  # noqa: E731
    return np.asarray(table), first, step, reorder, {"example": jnp.arange(2)}


def _exhaustive(table, example, alpha):
    """The best sequence by score / length**alpha over every sequence of
    tokens 1..V-1 that ends at EOS or at position L, padded after EOS."""
    best = (-np.inf, None, None)
    for n in range(1, L + 1):
        for seq in itertools.product(range(1, V), repeat=n):
            if any(t == EOS for t in seq[:-1]) or (n < L and seq[-1] != EOS):
                continue
            score, prev = 0.0, 0
            for pos, t in enumerate(seq):
                score += table[example, pos, prev, t]
                prev = t
            if score / n ** alpha > best[0]:
                best = (score / n ** alpha, list(seq) + [0] * (L - n), score)
    return best


@pytest.mark.parametrize("alpha", (0.0, 1.0))
def test_a_wide_beam_finds_the_exhaustive_optimum(alpha):
    table, first, step, reorder, cache = _markov(0)
    tokens, score = jax.jit(lambda c: generate.beam_search(first, step, reorder, c, 2, (V - 1) ** (L - 1), L, EOS,
                                                           alpha))(cache)
    for ex in range(2):
        _, seq, raw = _exhaustive(table, ex, alpha)
        assert np.asarray(tokens[ex]).tolist() == seq
        assert float(score[ex]) == pytest.approx(raw, abs=1e-5)


def test_one_beam_is_greedy_decoding():
    table, first, step, reorder, cache = _markov(1)
    tokens, _ = generate.beam_search(first, step, reorder, cache, 2, 1, L, EOS)
    for ex in range(2):
        prev, want = 0, []
        for pos in range(L):
            if EOS in want:
                want.append(0)
                continue
            prev = int(np.argmax(np.where(np.arange(V) == 0, -np.inf, table[ex, pos, prev])))
            want.append(prev)
        assert np.asarray(tokens[ex]).tolist() == want


@pytest.mark.parametrize("scan, projections_2d", [(False, False), (True, False), (True, True)])
def test_cached_decoding_gives_the_teacher_forced_log_probs(data_dir, scan, projections_2d):
    """Fed a caption token by token (with 2 beams, so the cache is reordered),
    the KV-cached decoder's log-probabilities at every position equal the
    log-softmax of the full forward pass's logits."""
    cfg = load_tiny_config(data_dir, "configs/default.py:coca",
                           **{"model.scan": scan, "model.projections_2d": projections_2d})
    run = session.setup(cfg)
    params = jax.jit(run.init_state)(jax.random.PRNGKey(0))["params"]
    rng = np.random.default_rng(0)
    length = cfg.model.text.max_len
    images = jnp.asarray(rng.standard_normal((2, cfg.data.image_size, cfg.data.image_size, 3)), jnp.float32)
    tokens = jnp.asarray(rng.integers(1, 20, (2, length)), jnp.int32)
    full = np.asarray(jax.nn.log_softmax(jax.jit(run.objective.logits)(params, images, tokens), axis=-1))

    @jax.jit
    def cached(params, images, tokens):
        first, step, reorder, cache = run.objective.decoding(params, images, beams=2)
        out, cache = first(cache)
        cache = reorder(cache, jnp.repeat(jnp.arange(2), 2))
        rows = jnp.repeat(tokens, 2, axis=0)
        swap = jnp.asarray([1, 0, 3, 2])  # beams trade places every step: reordering must follow them
        outs = [out]
        for pos in range(1, length):
            logp, cache = step(cache, rows[:, pos - 1], pos)
            outs.append(logp.reshape(2, 2, -1)[:, 0])
            cache, rows = reorder(cache, swap), rows[swap]
        return jnp.stack(outs, axis=1)

    np.testing.assert_allclose(np.asarray(cached(params, images, tokens)), full, atol=2e-5)


def test_beam_captions_are_well_formed_and_scored_by_the_teacher_forced_model(data_dir):
    """Four beams on a tiny CoCa: each caption pads only after EOS, and its
    score is the summed log-probability the full forward pass gives it."""
    cfg = load_tiny_config(data_dir, "configs/default.py:coca")
    run = session.setup(cfg)
    params = jax.jit(run.init_state)(jax.random.PRNGKey(2))["params"]
    images = jnp.asarray(np.random.default_rng(1).standard_normal((3, cfg.data.image_size, cfg.data.image_size, 3)),
                         jnp.float32)
    eos = run.ds.tokenizer.eos_id

    @jax.jit
    def decode(params, images):
        first, step, reorder, cache = run.objective.decoding(params, images, 4)
        return generate.beam_search(first, step, reorder, cache, 3, 4, cfg.model.text.max_len, eos)

    tokens, score = decode(params, images)
    logp = np.asarray(jax.nn.log_softmax(jax.jit(run.objective.logits)(params, images, tokens), axis=-1))
    seqs = np.asarray(tokens)
    for row, lp, sc in zip(seqs, logp, np.asarray(score)):
        nz = np.flatnonzero(row == 0)
        if nz.size:  # padding only after the end
            assert (row[nz[0]:] == 0).all() and eos in row[:nz[0]]
        real = row != 0
        assert sc == pytest.approx(float(lp[np.arange(len(row)), row][real].sum()), abs=1e-4)
