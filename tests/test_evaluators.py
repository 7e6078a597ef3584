"""Evaluators from config.evals: built once, compiled once, keyed as before,
scored by the objective's own similarity."""

import os

import jax
import numpy as np
import pytest

from conftest import load_tiny_config, tiny_overrides
from vlm_jax import config as config_lib, evaluate, evaluators, objectives, session
from vlm_jax.errors import ConfigError
from vlm_jax.evaluators.retrieval import recall_at_k
from vlm_jax.evaluators.zeroshot import topk_accuracy


def _suite(cfg):
    run = session.setup(cfg)
    params = jax.jit(run.init_state, out_shardings=run.state_sh)(jax.random.PRNGKey(0))["params"]
    return run, evaluators.Suite(cfg, run.mesh, run.objective.embedder(), run.ds), params


def test_evaluators_compile_once_per_run(data_dir):
    run, suite, params = _suite(load_tiny_config(data_dir))
    other = jax.tree_util.tree_map(lambda x: x * 1.01, params)
    events = []
    listener = lambda name, *a, **kw: events.append(name) if "compile" in name else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        first = suite.run(params)
        n_first = len(events)
        second = suite.run(other)
        assert len(events) == n_first, events[n_first:]  # new parameters, nothing compiled
    finally:
        jax.monitoring.clear_event_listeners()
    assert set(first) == set(second)
    assert "zeroshot/test_seen/top1" in first and "retrieval/test_unseen/t2i_r10" in first


def test_entries_of_one_kind_on_one_split_are_prefixed_by_their_names(data_dir):
    cfg = load_tiny_config(data_dir, **{"evals.retrieval.splits": "()"})
    with cfg.evals.unlocked():
        cfg.evals.plain = config_lib.eval_entry("zeroshot", splits=("test_seen",), templates=("{}",),
                                                max_examples=64, batch_size=32)
    config_lib.check_config(cfg)
    _, suite, params = _suite(cfg)
    keys = set(suite.run(params))
    assert {"zeroshot/zeroshot/test_seen/top1", "plain/zeroshot/test_seen/top1",
            "zeroshot/zeroshot/test_unseen/top1"} <= keys  # one prefix for all of an entry's keys
    assert "zeroshot/test_seen/top1" not in keys


def test_entry_mistakes_name_the_field(data_dir):
    with pytest.raises(ConfigError, match=r"config.evals.zeroshot.templtes'; did you mean 'templates'"):
        load_tiny_config(data_dir, **{"evals.zeroshot.templtes": "('{}',)"})
    with pytest.raises(ConfigError, match=r"config.evals.zeroshot.templates\[0\]: 'photo' has no"):
        load_tiny_config(data_dir, **{"evals.zeroshot.templates": "('photo',)"})
    with pytest.raises(ConfigError, match=r"config.evals.zeroshot.splits: split 'test' not in the dataset"):
        _suite(load_tiny_config(data_dir, **{"evals.zeroshot.splits": "('test',)"}))
    with pytest.raises(ConfigError, match=r"config.evals.zeroshot.label_key: dataset 'vlm_shapes' has no class-label"):
        _suite(load_tiny_config(data_dir, **{"evals.zeroshot.label_key": "caption"}))


def test_evaluate_cli_evaluates_an_earlier_step(trained_softmax, data_dir, capsys):
    workdir, rows = trained_softmax  # keeps checkpoints 20 and 24; the run evaluated at 24
    out = evaluate.main(["--config", "configs/default.py", "--workdir", workdir, "--step", "20"]
                        + tiny_overrides(data_dir))
    assert "step 20" in capsys.readouterr().out
    assert set(out) == {k for k in rows[-1] if k.startswith(("zeroshot/", "retrieval/"))}
    assert any(out[k] != rows[-1][k] for k in out)  # other weights, other numbers
    assert os.path.exists(os.path.join(workdir, "eval_step20.json"))
    with pytest.raises(SystemExit, match=r"--step 3: .* holds checkpoints \[20, 24\]"):
        evaluate.main(["--config", "configs/default.py", "--workdir", workdir, "--step", "3"]
                      + tiny_overrides(data_dir))


# --------------------------------------------------------------------------- metrics and FILIP's similarity


def test_topk_and_recall_against_hand_computed_values():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1], [0.0, 0.4, 0.8]])
    assert topk_accuracy(scores, np.array([0, 0, 0]), ks=(1, 2, 3)) == {"top1": 1 / 3, "top2": 2 / 3, "top3": 1.0}
    pos = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 1]], dtype=bool)  # the last query has two positives
    assert recall_at_k(scores, pos, ks=(1, 2, 3)) == {1: 2 / 3, 2: 2 / 3, 3: 1.0}


def _filip_reference(img, tok, mask):
    """float64 token-wise similarities: s^I (image→text) and s^T (text→image), as [image, text]."""
    s = np.einsum("akd,crd->ackr", np.float64(img), np.float64(tok))
    valid = mask[None, :, None, :] > 0
    s_i = np.where(valid, s, -np.inf).max(axis=3).mean(axis=2)
    s_t = (s.max(axis=2) * mask[None]).sum(axis=2) / mask.sum(axis=1)[None]
    return s_i, s_t


def test_filip_is_evaluated_with_its_token_wise_similarity():
    from vlm_jax.objectives.filip import TokenEmbedder

    rng = np.random.default_rng(0)
    img = rng.normal(size=(7, 5, 8)).astype(np.float32)
    tok = rng.normal(size=(11, 6, 8)).astype(np.float32)
    mask = (np.arange(6)[None] < rng.integers(1, 7, size=11)[:, None]).astype(np.float32)
    embedder = TokenEmbedder(model=None, rows=3, cols=4)  # blocks that do not divide 7 × 11
    i2t, t2i = embedder.scores(img, (tok, mask))
    s_i, s_t = _filip_reference(img, tok, mask)
    np.testing.assert_allclose(i2t, s_i, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t2i, s_t.T, rtol=1e-5, atol=1e-5)
    cls = embedder.class_scores(img, (tok[:10], mask[:10]), 5, 2)
    np.testing.assert_allclose(cls, s_i[:, :10].reshape(7, 5, 2).mean(axis=2), rtol=1e-5, atol=1e-5)


def test_each_objective_names_its_evaluation_similarity():
    assert isinstance(objectives.OBJECTIVES["filip"].embedder(
        objectives.OBJECTIVES["filip"](None, None, None)), objectives.filip.TokenEmbedder)
    for kind in ("softmax", "sigmoid", "unicl", "slip"):
        assert isinstance(objectives.OBJECTIVES[kind](None, None, None).embedder(), objectives.PooledEmbedder)
