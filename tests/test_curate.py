"""Curation: noisy pairs in the embedded data, scoring with a trained model,
the index, and training on it with exact resume."""

import json

import numpy as np
import pytest

from conftest import load_tiny_config, tiny_overrides
from vlm_jax import curate, session
from vlm_jax.data import images, pipeline, scenes, shapes_tfds
from vlm_jax.errors import ConfigError


def test_auroc_and_near_duplicates_match_direct_computations():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 40).round(1), rng.normal(0, 1, 30).round(1)  # rounded: ties occur
    direct = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert curate.auroc(pos, neg) == pytest.approx(direct)
    emb = np.eye(4)[[0, 1, 0, 2, 1]].astype(np.float32)  # 2 repeats 0, 4 repeats 1
    order = np.array([4, 3, 2, 1, 0])  # best first: 4 is kept, then 1 duplicates it
    np.testing.assert_array_equal(curate.near_duplicates(emb, order, 0.99, block=2), [True, True, False, False, False])
    assert curate.repeated_fraction("a red red red circle") == pytest.approx(2 / 5)


def test_noisy_captions_are_deterministic_flagged_and_about_the_fraction():
    swapped = [scenes.noisy_caption(0, "train", i, 0.3, 2000) for i in range(2000)]
    assert swapped == [scenes.noisy_caption(0, "train", i, 0.3, 2000) for i in range(2000)]
    frac = np.mean([c is not None for c in swapped])
    assert 0.25 < frac < 0.33  # 30 % drawn, less the draws that happen to say the same
    for i, c in enumerate(swapped[:200]):
        if c is not None:
            assert c != scenes.make_scene(0, "train", i, 16).caption
    assert all(scenes.noisy_caption(0, "train", i, 0.0, 2000) is None for i in range(50))


@pytest.fixture(scope="module")
def noisy_dir(data_dir):
    shapes_tfds.prepare(data_dir, "tiny_noisy30")
    return data_dir


def test_the_noisy_config_swaps_train_captions_only(noisy_dir):
    noisy = shapes_tfds.builder(noisy_dir, "tiny_noisy30").as_data_source()
    clean = shapes_tfds.builder(noisy_dir, "tiny").as_data_source()
    flags = np.asarray([noisy["train"][i]["swapped"] for i in range(len(noisy["train"]))])
    assert 0.2 < flags.mean() < 0.4
    assert not any(noisy["test_seen"][i]["swapped"] for i in range(len(noisy["test_seen"])))
    # The same images as the clean config; only the flagged examples' captions differ.
    by_image = {clean["train"][i]["image"].tobytes(): clean["train"][i]["caption"] for i in range(len(clean["train"]))}
    for i in range(0, len(noisy["train"]), 7):
        row = noisy["train"][i]
        assert (by_image[row["image"].tobytes()] != row["caption"]) == bool(row["swapped"])


def _curate(trained, noisy_dir, out, *extra):
    workdir, _ = trained
    return curate.main(["--config", "configs/default.py", "--workdir", workdir, "--out", str(out),
                        "--dataset_config", "tiny_noisy30", "--keep_fraction", "0.7", "--chunk", "384", *extra]
                       + tiny_overrides(noisy_dir))


def test_curation_scores_every_pair_resumes_after_a_kill_and_writes_the_index(trained_softmax, noisy_dir, tmp_path,
                                                                               monkeypatch):
    whole = _curate(trained_softmax, noisy_dir, tmp_path / "whole.json")
    n = whole["num_examples"]
    assert n == 1024 and len(whole["kept"]) == round(0.7 * n) and whole["dropped"]["low_clip_score"] == n - len(whole["kept"])
    kept_scores = np.asarray(whole["scores"])[whole["kept"]]
    dropped = [s for s, r in zip(whole["scores"], whole["drop_reason"]) if r]
    assert kept_scores.min() >= max(dropped)  # the best 70 % by score
    assert 0.0 <= whole["swapped"]["auroc_clean_over_swapped"] <= 1.0 and whole["swapped"]["num_swapped"] > 200
    assert json.load(open(tmp_path / "whole.json"))["kept"] == whole["kept"]

    # Killed after its first chunk, the same command continues from the saved scores.
    real = pipeline.load_split

    def dies_on_the_second_chunk(*args, start=0, **kwargs):
        if start >= 384:
            raise KeyboardInterrupt
        return real(*args, start=start, **kwargs)

    monkeypatch.setattr(pipeline, "load_split", dies_on_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        _curate(trained_softmax, noisy_dir, tmp_path / "again.json")
    assert (tmp_path / "again.json.partial.npz").exists()
    calls = []
    monkeypatch.setattr(pipeline, "load_split", lambda *a, start=0, **k: calls.append(start) or real(*a, start=start, **k))
    again = _curate(trained_softmax, noisy_dir, tmp_path / "again.json")
    assert 0 not in calls  # the first chunk was not scored again
    assert again["scores"] == whole["scores"] and again["kept"] == whole["kept"]
    assert not (tmp_path / "again.json.partial.npz").exists()

    # Scores saved without embeddings cannot serve --dedup: that run scores again from the start.
    monkeypatch.setattr(pipeline, "load_split", dies_on_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        _curate(trained_softmax, noisy_dir, tmp_path / "dedup.json")
    calls.clear()
    monkeypatch.setattr(pipeline, "load_split", lambda *a, start=0, **k: calls.append(start) or real(*a, start=start, **k))
    dedup = _curate(trained_softmax, noisy_dir, tmp_path / "dedup.json", "--dedup", "0.999")
    assert 0 in calls and dedup["scores"] == whole["scores"]


def test_training_reads_only_the_kept_examples_and_resumes_exactly(trained_softmax, noisy_dir, tmp_path):
    index = _curate(trained_softmax, noisy_dir, tmp_path / "idx.json")
    cfg = load_tiny_config(noisy_dir, **{"data.dataset_config": "tiny_noisy30",
                                         "data.index_file": str(tmp_path / "idx.json")})
    run = session.setup(cfg)
    source = run.ds.sources["train"]
    kept_images = {images.decode_rgb(source[i]["image"]).tobytes() for i in index["kept"]}
    c = cfg.data.copy_and_resolve_references()
    with c.unlocked():
        c.crop_area = (1.0, 1.0)  # the stored 64 px scene itself, to recognise it
        c.image_size = 64
    stream = pipeline.train_dataset(run.ds, c, 16, 32, 0)
    it = iter(stream)
    first = [next(it) for _ in range(3)]
    for batch in first:
        assert all(im.tobytes() in kept_images for im in batch["image"])
    state = it.get_state()
    later = [next(it)["image"] for _ in range(2)]
    resumed = iter(pipeline.train_dataset(run.ds, c, 16, 32, 0))
    resumed.set_state(state)
    for want in later:
        np.testing.assert_array_equal(next(resumed)["image"], want)


def test_a_wrong_index_is_refused_by_name(trained_softmax, noisy_dir, tmp_path):
    _curate(trained_softmax, noisy_dir, tmp_path / "idx.json")
    with pytest.raises(ConfigError, match=r"config.data.index_file: .* indexes vlm_shapes/tiny_noisy30 split 'train'"):
        session.setup(load_tiny_config(noisy_dir, **{"data.index_file": str(tmp_path / "idx.json")}))  # the clean data
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="is not a curated index"):
        session.setup(load_tiny_config(noisy_dir, **{"data.index_file": str(tmp_path / "bad.json")}))


def test_balancing_clusters_and_rank_weights_match_direct_computations():
    groups = np.array([0, 0, 0, 0, 1, 1, 2, 0, 1])
    scores = np.array([0.9, 0.1, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4])
    kept = np.array([0, 1, 2, 3, 4, 5, 6, 8])  # 7 was dropped before balancing
    ids, capped = curate.balance(groups, kept, scores, per_group=2, oversample=False)
    np.testing.assert_array_equal(ids, [0, 3, 5, 6, 8])  # the best two of each group by score
    np.testing.assert_array_equal(np.sort(capped), [1, 2, 4])
    ids, _ = curate.balance(groups, kept, scores, per_group=3, oversample=True)
    np.testing.assert_array_equal(ids, [0, 2, 3, 4, 5, 6, 6, 6, 8])  # group 2's one example, three times
    np.testing.assert_allclose(curate.rank_weights(np.array([0.3, 0.1, 0.9, 0.3]), 0.2), [0.2 + 0.8 / 3, 0.2, 1.0,
                                                                                            0.2 + 0.8 / 3])
    rng = np.random.default_rng(0)
    centres = np.eye(8)[:3]
    truth = rng.integers(0, 3, 300)
    emb = centres[truth] + 0.05 * rng.normal(size=(300, 8))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    found = curate.spherical_kmeans(emb, 3, seed=0)
    assert len({(t, f) for t, f in zip(truth, found)}) == 3  # the same partition, up to the cluster names
    np.testing.assert_array_equal(found, curate.spherical_kmeans(emb, 3, seed=0))


@pytest.mark.slow
def test_a_balanced_weighted_index_feeds_its_weights_to_the_loss(trained_softmax, noisy_dir, tmp_path):
    from vlm_jax import metrics, train

    index = _curate(trained_softmax, noisy_dir, tmp_path / "bal.json", "--balance", "label", "--per_group", "12",
                    "--oversample", "--weight_floor", "0.25")
    labels = np.asarray(index["groups"]["of_example"])
    kept = np.asarray(index["kept"])
    counts = np.bincount(labels[kept])
    assert set(counts[counts > 0]) == {12} and index["dropped"]["group_cap"] > 0
    scores = np.asarray(index["scores"])
    for g in np.unique(labels[kept]):  # each class keeps its best-scoring examples
        members = np.flatnonzero((labels == g) & (np.asarray(index["drop_reason"]) == ""))
        capped = np.flatnonzero((labels == g) & (np.asarray(index["drop_reason"]) == "group_cap"))
        if len(capped):
            assert scores[members].min() >= scores[capped].max()
    weights = np.asarray(index["weights"])
    assert len(weights) == len(kept) and weights.min() == pytest.approx(0.25) and weights.max() == pytest.approx(1.0)

    base = {"data.dataset_config": "tiny_noisy30", "data.index_file": str(tmp_path / "bal.json"),
            "train.steps": 2, "train.eval_every": 0, "train.checkpoint_every": 2}
    cfg = load_tiny_config(noisy_dir, **base, **{"data.index_weights": True})
    run = session.setup(cfg)
    c = cfg.data.copy_and_resolve_references()
    with c.unlocked():
        c.crop_area, c.image_size = (1.0, 1.0), 64
    by_image = {images.decode_rgb(run.ds.sources["train"][int(i)]["image"]).tobytes(): w for i, w in zip(kept, weights)}
    batch = next(iter(pipeline.train_dataset(run.ds, c, 16, 32, 0, fields=run.fields)))
    np.testing.assert_array_equal(batch["weight"], [by_image[im.tobytes()] for im in batch["image"]])

    # Unit weights train exactly as no weights; the index's weights change the loss.
    unit = dict(index, weights=[1.0] * len(kept))
    (tmp_path / "unit.json").write_text(json.dumps(unit))
    losses = {}
    for name, extra in (("plain", {}), ("unit", {"data.index_file": str(tmp_path / "unit.json"),
                                                  "data.index_weights": True}),
                        ("weighted", {"data.index_weights": True})):
        train.train(load_tiny_config(noisy_dir, **{**base, **extra}), str(tmp_path / name))
        losses[name] = [r["train/loss"] for r in metrics.read_metrics(str(tmp_path / name)) if "train/loss" in r]
    np.testing.assert_allclose(losses["unit"], losses["plain"], rtol=1e-6)
    assert losses["weighted"][0] != pytest.approx(losses["plain"][0], rel=1e-4)

    # The index's content is part of the run: the same path with other content is refused on resume.
    (tmp_path / "bal.json").write_text(json.dumps(dict(index, weights=[0.5] * len(kept))))
    more = {**base, "data.index_weights": True, "train.steps": 4}
    with pytest.raises(ConfigError, match=r"holds a run with another config \(config.inputs.index_file_sha256 was"):
        train.train(load_tiny_config(noisy_dir, **more), str(tmp_path / "weighted"))


def test_pair_weights_are_refused_where_they_cannot_apply(trained_softmax, noisy_dir, tmp_path):
    _curate(trained_softmax, noisy_dir, tmp_path / "plain.json")
    over = {"data.dataset_config": "tiny_noisy30", "data.index_file": str(tmp_path / "plain.json"),
            "data.index_weights": True}
    with pytest.raises(ConfigError, match=r"config.data.index_weights: .* holds no pair weights; write them with "
                                          r"python -m vlm_jax.curate --weight_floor"):
        session.setup(load_tiny_config(noisy_dir, **over))
    with pytest.raises(ConfigError, match=r"config.data.index_weights: objective 'unicl' does not weight its pairs"):
        session.setup(load_tiny_config(noisy_dir, "configs/default.py:unicl", **over))
    with pytest.raises(ConfigError, match=r"config.data.index_weights: per-pair weights come from a curated index"):
        session.setup(load_tiny_config(noisy_dir, **{"data.index_weights": True}))
    with pytest.raises(SystemExit, match=r"error: --balance label: the dataset has no class-label feature 'caption'"):
        _curate(trained_softmax, noisy_dir, tmp_path / "x.json", "--balance", "label", "--config.data.label_key=caption")
