"""Evaluators from config.evals: built once, compiled once, keyed as before,
scored by the objective's own similarity."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from conftest import load_tiny_config, tiny_overrides
from vlm_jax import config as config_lib, evaluate, evaluators, objectives, session
from vlm_jax.data import scenes
from vlm_jax.errors import ConfigError
from vlm_jax.evaluators.retrieval import recall_at_k
from vlm_jax.evaluators.zeroshot import topk_accuracy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def _experiment(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "experiments", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_template_subsets_score_as_the_zero_shot_entry_given_only_those_templates(trained_softmax, data_dir):
    workdir, _ = trained_softmax
    templates = ("a {}", "a small {}", "a large {}")
    got = _experiment("template_selection").subset_scores(workdir, "validation", templates)
    assert sorted(got) == [(0,), (0, 1), (0, 1, 2), (0, 2), (1,), (1, 2), (2,)]
    for subset in [(1,), (0, 2), (0, 1, 2)]:
        cfg = load_tiny_config(data_dir, **{"evals.zeroshot.templates": str(tuple(templates[i] for i in subset)),
                                            "evals.zeroshot.splits": "('validation',)", "evals.retrieval.splits": "()"})
        run = session.setup(cfg)
        _, params = session.restore_params(cfg, run, workdir)
        want = evaluators.Suite(cfg, run.mesh, run.objective.embedder(), run.ds).run(params)
        assert {f"zeroshot/validation/{k}": v for k, v in got[subset].items()} == want
    assert len({tuple(sorted(m.items())) for m in got.values()}) > 1  # the subsets do score differently


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


# --------------------------------------------------------------------------- protocols against direct computations


def _recall_loop(sim, positives, k):
    """Per query: a hit if fewer than k negatives score at or above its best positive."""
    hits = 0
    for q in range(sim.shape[0]):
        pos = [sim[q, j] for j in range(sim.shape[1]) if positives[q, j]]
        if pos and sum(1 for j in range(sim.shape[1]) if not positives[q, j] and sim[q, j] >= max(pos)) < k:
            hits += 1
    return hits / sim.shape[0]


def test_multi_caption_retrieval_with_ties_equals_a_direct_count():
    from vlm_jax.evaluators.retrieval import caption_positives, retrieval_metrics

    rng = np.random.default_rng(0)
    owner = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])  # 4 images with 3, 2, 1, 4 captions
    captions = np.array(["a", "b", "c", "d", "a", "e", "f", "g", "h", "i"])  # "a" belongs to images 0 and 1
    sim = np.round(rng.normal(size=(4, 10)), 1)  # rounding makes ties
    sim[2] = 0.5  # image 2 scores every caption alike: no credit
    pos = caption_positives(owner, captions, 4)
    want = np.zeros((4, 10), bool)
    for j, (i, c) in enumerate(zip(owner, captions)):
        want[[m for m in range(4) if c in captions[owner == m]], j] = True
    np.testing.assert_array_equal(pos, want)
    assert pos[1, 0] and pos[0, 4]  # the shared string is a hit for both images
    out = retrieval_metrics(sim, sim.T, pos)
    for k in (1, 5, 10):
        assert out[f"i2t_r{k}"] == _recall_loop(sim, pos, k)
        assert out[f"t2i_r{k}"] == _recall_loop(sim.T, pos.T, k)
    assert recall_at_k(np.full((1, 3), 0.5), np.array([[True, False, False]]), ks=(1, 3)) == {1: 0.0, 3: 1.0}


def test_zero_shot_metrics_with_ties_and_per_class_recall_equal_a_direct_count():
    from vlm_jax.evaluators.zeroshot import classification_metrics

    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(size=(50, 6)), 1)
    labels = rng.integers(0, 5, size=50)  # class 5 never occurs
    metrics, per_class = classification_metrics(scores, labels, list("abcdef"))
    rank = [sum(1 for c in range(6) if c != y and s[c] >= s[y]) for s, y in zip(scores, labels)]
    assert metrics["top1"] == np.mean([r < 1 for r in rank]) and metrics["top5"] == np.mean([r < 5 for r in rank])
    recall = {name: np.mean([r == 0 for r, y in zip(rank, labels) if y == c]) for c, name in enumerate("abcde")}
    assert per_class == pytest.approx(recall) and "f" not in per_class
    assert metrics["mean_per_class_recall"] == pytest.approx(np.mean(list(recall.values())))


def test_the_clip_template_sets_are_data_files():
    from vlm_jax.evaluators import zeroshot

    full = zeroshot.read_lines(os.path.join(zeroshot.TEMPLATE_DIR, "clip_imagenet_80.txt"), "t")
    subset = zeroshot.read_lines(os.path.join(zeroshot.TEMPLATE_DIR, "clip_imagenet_7.txt"), "t")
    assert len(full) == len(set(full)) == 80 and len(subset) == 7 and set(subset) <= set(full)
    assert all(t.count("{}") == 1 for t in full) and "a photo of a {}." in full and "itap of a {}." in subset


def _gaussian_clusters(rng, n_per_class, classes=4, dim=8, spread=0.3):
    centres = rng.normal(size=(classes, dim)) * 3
    y = np.repeat(np.arange(classes), n_per_class)
    return (centres[y] + spread * rng.normal(size=(len(y), dim))).astype(np.float32), y


def test_the_probe_separates_separable_clusters_and_stops_at_the_optimum():
    from vlm_jax.evaluators.probe import Probe

    rng = np.random.default_rng(2)
    x, y = _gaussian_clusters(rng, 40)
    xt, yt = _gaussian_clusters(np.random.default_rng(2), 40)  # same centres
    xt = xt + 0.1 * rng.normal(size=xt.shape).astype(np.float32)
    probe = Probe(x, y, 4, steps=200, pad_to=len(x) + 7)  # padding must not change the fit
    weights, bias = probe.fit(np.arange(len(x)), l2=1e-2)
    assert np.mean(np.argmax(probe.scores((weights, bias), xt), axis=1) == yt) == 1.0
    # First-order optimality of mean cross-entropy + l2/2·||W||², in float64.
    xs = probe.x.astype(np.float64)
    logits = xs @ weights + bias
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    grad_w = xs.T @ p / len(y) + 1e-2 * weights
    grad_b = p.mean(axis=0)
    assert np.abs(grad_w).max() < 1e-3 and np.abs(grad_b).max() < 1e-3


def test_perturbations_change_one_thing_each():
    from vlm_jax.data import scenes

    caption = "a red circle left of a blue square"
    p = scenes.perturbations(caption)
    assert p["relation"] == "a red circle right of a blue square"
    assert p["swap"] == "a blue square left of a red circle"
    assert p["binding"] == "a blue circle left of a red square"
    assert sorted(p["swap"].split()) == sorted(caption.split()) == sorted(p["binding"].split())
    assert p["colour"].split()[2:] == caption.split()[2:] and p["colour"] != caption
    assert scenes.perturbations("three green crosses")["count"] in ("four green crosses", "two green crosses")
    assert set(scenes.perturbations("a small red circle")) == {"colour", "shape"}
    with pytest.raises(ValueError, match="grammar"):
        scenes.perturbations("a photo of a dog")


class _BagOfWords(evaluators.Embedder):
    """Texts: counts of their tokens times a fixed integer matrix (word order
    is lost exactly, whatever the summation order); images: their mean colour
    times another matrix."""

    def __init__(self, vocab, dim=16):
        rng = np.random.default_rng(3)
        self.words = jax.numpy.asarray(rng.integers(-8, 9, size=(vocab, dim)), jax.numpy.float32)
        self.pixels = jax.numpy.asarray(rng.normal(size=(3, dim)), jax.numpy.float32)

    def images(self, params, images):
        return images.astype(jax.numpy.float32).mean(axis=(1, 2)) @ self.pixels

    def texts(self, params, tokens):
        counts = jax.nn.one_hot(tokens, self.words.shape[0]).at[..., 0].set(0).sum(axis=1)
        return counts @ self.words

    def scores(self, img, txt):
        return img @ txt.T, txt @ img.T

    def class_scores(self, img, prompts, num_classes, num_templates):
        return img @ prompts.reshape(num_classes, num_templates, -1).mean(axis=1).T


def test_a_model_that_ignores_word_order_is_at_chance_on_swaps_and_relations(data_dir):
    cfg = load_tiny_config(data_dir, **{"evals.compositional.splits": "('test_seen', 'test_unseen')",
                                        "evals.compositional.max_examples": 256, "evals.zeroshot.splits": "()",
                                        "evals.retrieval.splits": "()", "model.text.max_len": 48})  # no caption cut
    run = session.setup(cfg)
    suite = evaluators.Suite(cfg, run.mesh, _BagOfWords(run.ds.tokenizer.vocab_size), run.ds)
    out = suite.run({})
    for split in ("test_seen", "test_unseen"):
        assert out[f"compositional/{split}/swap"] == 0.5 and out[f"compositional/{split}/binding"] == 0.5
        assert abs(out[f"compositional/{split}/relation"] - 0.5) < 0.2
    from vlm_jax.evaluators.compositional import pairwise_accuracy

    assert pairwise_accuracy(np.array([1.0, 2.0, 3.0, 0.0]), np.array([0.0, 2.0, 4.0, -1.0])) == (1 + 0.5 + 0 + 1) / 4


def test_the_linear_probe_beats_zero_shot_on_the_trained_model_and_reports_every_evaluator(
        trained_softmax, data_dir, tmp_path):
    workdir, _ = trained_softmax
    overrides = tiny_overrides(data_dir, **{
        "evals.linear_probe.splits": "('test_seen',)", "evals.linear_probe.train_examples": 1024,
        "evals.linear_probe.max_examples": 256, "evals.fewshot.splits": "('test_seen',)",
        "evals.fewshot.train_examples": 1024, "evals.fewshot.max_examples": 256, "evals.fewshot.seeds": 2,
        "evals.compositional.splits": "('test_seen',)", "evals.zeroshot.max_examples": 256,
        "evals.zeroshot.template_set": "clip_imagenet_7"})
    out = evaluate.main(["--config", "configs/default.py", "--workdir", workdir] + overrides)
    assert out["linear_probe/test_seen/top1"] > out["zeroshot/test_seen/top1"]
    for key in ("fewshot/test_seen/16shot_top1", "compositional/test_seen/mean", "retrieval/test_unseen/i2t_r1",
                "zeroshot/test_seen/mean_per_class_recall", "linear_probe/test_seen/l2"):
        assert key in out
    results = json.load(open(os.path.join(workdir, "eval_step24.json")))
    assert results["metrics"] == out
    per_class = results["details"]["zeroshot/test_seen"]["per_class_top1"]
    assert set(per_class) <= set(scenes.composition_names()) and len(per_class) > 10
    table = open(os.path.join(workdir, "eval_step24.md")).read()
    assert "## linear_probe" in table and "| test_seen |" in table


def test_an_external_labelled_dataset_is_evaluated_through_config_alone(trained_softmax, data_dir, tmp_path):
    from PIL import Image

    from vlm_jax.data import ingest

    workdir, _ = trained_softmax
    rng = np.random.default_rng(4)
    root = tmp_path / "pets"
    for c, (name, colour) in enumerate({"tabby": (200, 120, 40), "siamese": (230, 220, 200),
                                        "black cat": (20, 20, 20)}.items()):
        (root / name).mkdir(parents=True)
        for i in range(20):
            a = np.clip(np.array(colour) + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(a)
            img = [img, img.convert("L"), img.convert("P"), img.convert("RGBA"), img.convert("CMYK")][i % 5]
            img.save(root / name / f"{i}.{'jpg' if img.mode in ('L', 'CMYK') else 'png'}")
    ingest.run(ingest.parse_args(["folder", str(root), "--name", "pets", "--data_dir", str(tmp_path / "data"),
                                  "--label_from_dir", "--holdout_fraction", "0.4", "--workers", "1", "--quiet"]))
    config_file = tmp_path / "pets_config.py"
    config_file.write_text(
        "import importlib.util, os\n"
        "from vlm_jax.config import eval_entry\n"
        f"spec = importlib.util.spec_from_file_location('d', {os.path.join(REPO, 'configs', 'default.py')!r})\n"
        "default = importlib.util.module_from_spec(spec); spec.loader.exec_module(default)\n"
        "def get_config():\n"
        "    c = default.get_config()\n"
        f"    where = dict(dataset='pets', data_dir={str(tmp_path / 'data')!r}, label_key='label', batch_size=32)\n"
        "    c.evals.pets_zeroshot = eval_entry('zeroshot', splits=('holdout',), templates=('a photo of a {}.',), **where)\n"
        "    c.evals.pets_probe = eval_entry('linear_probe', splits=('holdout',), train_split='train', **where)\n"
        "    return c\n")
    out = evaluate.main(["--config", str(config_file), "--workdir", workdir] + tiny_overrides(data_dir))
    assert 0 <= out["zeroshot/holdout/top1"] <= 1 and out["linear_probe/holdout/top1"] > 0.6  # chance: 1/3


def test_filip_is_probed_token_wise_and_linearly_on_pooled_features(data_dir):
    cfg = load_tiny_config(data_dir, config_file="configs/default.py:filip", **{
        "evals.compositional.splits": "('test_seen',)", "evals.compositional.max_examples": 32,
        "evals.linear_probe.splits": "('test_seen',)", "evals.linear_probe.train_examples": 256,
        "evals.linear_probe.max_examples": 32, "evals.zeroshot.splits": "()", "evals.retrieval.splits": "()"})
    run, suite, params = _suite(cfg)
    assert isinstance(suite.ctx.embedder, objectives.filip.TokenEmbedder)
    out = suite.run(params)
    assert {"compositional/test_seen/swap", "linear_probe/test_seen/top1"} <= set(out)
