"""Few-shot transfer evaluators (vlm_jax.evaluators.transfer): each against
its definition, on the tiny model and data."""

import jax
import numpy as np
import pytest

from conftest import load_tiny_config
from vlm_jax import config as config_lib, evaluators, session
from vlm_jax.errors import ConfigError
from vlm_jax.evaluators import transfer
from vlm_jax.evaluators.probe import shot_rows

SHOTS = dict(splits=("test_seen",), max_examples=64, batch_size=32, train_split="train", train_examples=256,
             shots=(2, 4), seeds=2, templates=("a {}",))


def _suite(cfg, **entries):
    with cfg.evals.unlocked():
        for name in list(cfg.evals.keys()):
            del cfg.evals[name]
        for name, (kind, fields) in entries.items():
            cfg.evals[name] = config_lib.eval_entry(kind, **fields)
    config_lib.check_config(cfg)
    run = session.setup(cfg)
    params = jax.jit(run.init_state, out_shardings=run.state_sh)(jax.random.PRNGKey(0))["params"]
    return evaluators.Suite(cfg, run.mesh, run.objective.embedder(), run.ds), params


@pytest.fixture(scope="module")
def vit_suite(data_dir):
    entries = {"zs": ("zeroshot", {k: SHOTS[k] for k in ("splits", "max_examples", "batch_size", "templates")}),
               "tip": ("tip_adapter", SHOTS),
               "adapter": ("clip_adapter", dict(SHOTS, steps=30, lr=1e-2)),
               "coop": ("coop", dict(SHOTS, steps=30, lr=1e-2)),
               "coop4": ("coop", dict(SHOTS, steps=30, lr=1e-2, n_ctx=3, shots=(4,), seeds=1)),
               "vpt": ("vpt", dict(SHOTS, steps=20, lr=1e-2, train_batch=16))}
    suite, params = _suite(load_tiny_config(data_dir), **entries)
    return suite, params, suite.run(params), suite.details()


def _evaluator(suite, name):
    return next(ev for ev in suite.evaluators if ev.name == name)


def _tip_logits(f, keys, values, w, alpha, beta, leave_out=False):
    affinity = np.exp(-beta * (1 - np.float64(f) @ np.float64(keys).T))
    if leave_out:
        affinity[np.arange(len(f)), np.arange(len(f))] = 0
    return 100.0 * np.float64(f) @ np.float64(w).T + alpha * affinity @ values


def test_tip_adapter_equals_its_formula_without_a_gradient_step(vit_suite, monkeypatch):
    suite, params, metrics, details = vit_suite
    ev = _evaluator(suite, "tip")
    monkeypatch.setattr(transfer, "adam_fit", lambda *a, **k: pytest.fail("Tip-Adapter took a gradient step"))
    with suite.ctx.one_pass():
        f_train, y_train = ev.train_embeddings(params)
        f, y = ev.eval_embeddings(params, "test_seen")
        w = ev.class_embeddings(params)
        got = ev.evaluate_split(params, "test_seen")
    assert set(got) == {"2shot_top1", "4shot_top1"} and got == {k.split("/")[-1]: v for k, v in metrics.items()
                                                                 if k.startswith("tip_adapter/")}
    num_classes = w.shape[0]
    chosen = details["tip_adapter/test_seen"]["alpha_beta"]
    for k in (2, 4):
        accs = []
        for seed in range(2):
            rows = shot_rows(y_train, num_classes, k, seed)
            keys, values = f_train[rows], np.eye(num_classes)[y_train[rows]]
            # (alpha, beta): the first best of the grid by leave-one-out accuracy on the shots
            loo = {(a, b): np.mean(np.argmax(_tip_logits(keys, keys, values, w, a, b, True), 1) == y_train[rows])
                   for a in ev.entry.alpha_grid for b in ev.entry.beta_grid}
            best = max(loo.values())
            assert tuple(chosen[f"{k}shot"][seed]) == next(ab for ab, acc in loo.items() if acc == best)
            logits = _tip_logits(f, keys, values, w, *chosen[f"{k}shot"][seed])
            accs.append(np.mean(np.argmax(logits, axis=1) == y))
        assert got[f"{k}shot_top1"] == pytest.approx(np.mean(accs), abs=1e-9)
    # every class has k shots drawn from the training examples of that class
    rows = shot_rows(y_train, num_classes, 4, 0)
    counts = np.bincount(y_train, minlength=num_classes)
    assert np.all(np.bincount(y_train[rows], minlength=num_classes) == np.minimum(4, counts))


def test_tip_adapter_without_its_cache_is_zero_shot(data_dir):
    fields = {k: SHOTS[k] for k in ("splits", "max_examples", "batch_size", "templates")}
    suite, params = _suite(load_tiny_config(data_dir), zs=("zeroshot", fields),
                           tip=("tip_adapter", dict(SHOTS, alpha_grid=(0.0,), beta_grid=(5.5,), shots=(4,),
                                                                seeds=1)))
    m = suite.run(params)
    assert m["tip_adapter/test_seen/4shot_top1"] == m["zeroshot/test_seen/top1"]


def test_coop_starts_from_the_template_and_learns_its_shots(vit_suite):
    suite, params, metrics, details = vit_suite
    ev = _evaluator(suite, "coop")
    # Before training, the context is the template's own words: the prompts equal zero-shot's.
    init = jax.jit(suite.ctx.embedder.token_vectors)(params, ev.ctx_ids)
    tuned_at_init = np.asarray(ev._texts(params, init))
    plain = ev.encoder.texts(params, ev.prompt_tokens)
    np.testing.assert_allclose(tuned_at_init, plain, atol=1e-6)
    for name in ("coop", "coop4", "adapter", "vpt"):
        other = _evaluator(suite, name)
        for k, per_seed in details[f"{other.prefix}{other.namespace}/test_seen"]["train_loss"].items():
            for first, last in per_seed:
                assert last < first, (name, k, first, last)  # the fit lowers its loss on the shots


def test_transfer_is_a_function_of_the_seed(vit_suite, data_dir):
    suite, params, metrics, _ = vit_suite
    again = suite.run(params)
    assert again == metrics
    keys = {k for k in metrics if "shot_top1" in k}
    assert keys == ({f"{kind}/test_seen/{k}shot_top1" for kind in ("tip_adapter", "clip_adapter", "vpt") for k in (2, 4)}
                    | {"coop/coop/test_seen/2shot_top1", "coop/coop/test_seen/4shot_top1",
                       "coop4/coop/test_seen/4shot_top1"})


def test_visual_prompts_change_the_image_embedding_but_not_its_token_count(vit_suite):
    suite, params, _, _ = vit_suite
    embedder = suite.ctx.embedder
    images = _evaluator(suite, "vpt").labelled_split("train")["image"][:4]
    plain = np.asarray(jax.jit(embedder.images)(params, images))
    prompts = 0.5 * jax.random.normal(jax.random.PRNGKey(1), (3, embedder.image_prompt_width))
    prompted = np.asarray(jax.jit(embedder.prompted_images)(params, images, prompts))
    assert prompted.shape == plain.shape
    np.testing.assert_allclose(np.linalg.norm(prompted, axis=1), 1.0, rtol=1e-5)
    assert np.abs(prompted - plain).max() > 1e-3


def test_transfer_mistakes_are_config_errors(data_dir):
    resnet = load_tiny_config(data_dir, **{"model.image.tower": "resnet", "model.image.layers": "(1, 1)",
                                           "model.image.base_width": 8})
    with pytest.raises(ConfigError, match=r"config.evals.vpt.kind: vpt adds prompt tokens to a ViT image tower.*"
                                          r"tower='resnet'"):
        _suite(resnet, vpt=("vpt", SHOTS))
    filip = load_tiny_config(data_dir, "configs/default.py:filip")
    with pytest.raises(ConfigError, match=r"config.evals.tip.kind: tip_adapter needs a model scored by one pooled"):
        _suite(filip, tip=("tip_adapter", SHOTS))
    with pytest.raises(ConfigError, match=r"config.evals.coop.n_ctx: the first template '\{\}' has no words"):
        _suite(load_tiny_config(data_dir), coop=("coop", dict(SHOTS, templates=("{}",))))
    with pytest.raises(ConfigError, match=r"config.evals.adapter.shots: must hold one or more positive"):
        _suite(load_tiny_config(data_dir), adapter=("clip_adapter", dict(SHOTS, shots=(0,))))
    with pytest.raises(ConfigError, match=r"config.evals.tip.train_split: split 'val' not in the dataset"):
        _suite(load_tiny_config(data_dir), tip=("tip_adapter", dict(SHOTS, train_split="val")))
