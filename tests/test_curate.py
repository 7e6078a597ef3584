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
