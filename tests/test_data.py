"""The embedded dataset, tokenizers and the grain pipeline."""

import numpy as np
import pytest

from vlm_jax.config import base_config
from vlm_jax.data import pipeline, scenes, tokenizers


def test_scenes_are_a_pure_function_of_seed_split_index():
    a = scenes.make_scene(0, "train", 7)
    assert a == scenes.make_scene(0, "train", 7)
    assert a != scenes.make_scene(1, "train", 7)
    assert scenes.make_scene(0, "train", 7) != scenes.make_scene(0, "test_seen", 7)


def test_withheld_compositions_never_appear_in_train_and_form_the_unseen_split():
    withheld = [f"{c} {s}" for c, s in scenes.WITHHELD]
    kinds = set()
    for _, s in scenes.iter_scenes(0, "train", 1500, image_size=16):
        assert not any(w in s.caption for w in withheld), s.caption
        kinds.add(s.kind)
    assert kinds == set(scenes.SCENE_KINDS)
    names = scenes.composition_names()
    for _, s in scenes.iter_scenes(0, "test_unseen", 200, image_size=16):
        assert names[s.label] in withheld
        mentioned = sorted((s.caption.find(n), n) for n in names if n in s.caption)
        assert mentioned[0][1] == names[s.label]  # the label is the composition named first


def test_captions_state_counts_and_relations():
    seen = {"count": False, "relation": False}
    for _, s in scenes.iter_scenes(3, "train", 300, image_size=16):
        if s.kind == "count":
            assert s.caption.split()[0] in scenes.COUNT_WORDS.values()
            seen["count"] = True
        if s.kind == "relation":
            assert any(r in s.caption for r in scenes.RELATIONS)
            assert not s.single_class
            seen["relation"] = True
    assert all(seen.values())


def test_tokenize_appends_eos_pads_and_truncates_keeping_eos():
    tok = tokenizers.ByteTokenizer()
    out = tokenizers.tokenize(tok, ["ab", "abcdefgh"], 5)
    assert out.dtype == np.int32 and out.shape == (2, 5)
    np.testing.assert_array_equal(out[0], [ord("a") + 2, ord("b") + 2, tok.eos_id, 0, 0])
    assert out[1, -1] == tok.eos_id and (out[1] != 0).all()


def test_sentencepiece_tokenizer_fitted_on_train_captions(data_dir):
    from vlm_jax.data import shapes_tfds

    tok = tokenizers.make_tokenizer("sentencepiece", shapes_tfds.tokenizer_path(data_dir, "tiny"))
    ids = tokenizers.tokenize(tok, ["a small red circle left of a blue square"], 16)[0]
    assert ids[ids != 0][-1] == tok.eos_id
    assert ids.max() < tok.vocab_size
    with pytest.raises(FileNotFoundError, match="tokenizer_path"):
        tokenizers.make_tokenizer("sentencepiece", data_dir + "/nope.model")


def _data_cfg(data_dir):
    c = base_config().data
    c.data_dir, c.dataset_config = data_dir, "tiny"
    return c


def test_train_stream_resumes_exactly_from_its_state(data_dir):
    cfg = _data_cfg(data_dir)
    ds = pipeline.open_dataset(cfg)
    it = iter(pipeline.train_dataset(ds, cfg, 16, 32, seed=5))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(40)]  # crosses an epoch boundary (1024 / 32 = 32 batches)
    it2 = iter(pipeline.train_dataset(ds, cfg, 16, 32, seed=5))
    it2.set_state(state)
    for want in expected:
        got = next(it2)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["text"], want["text"])
    assert expected[0]["image"].shape == (32, 32, 32, 3) and expected[0]["image"].dtype == np.uint8


def test_processes_split_the_same_global_batches(data_dir):
    cfg = _data_cfg(data_dir)
    ds = pipeline.open_dataset(cfg)
    single = iter(pipeline.train_dataset(ds, cfg, 16, 64, 0))
    shares = [iter(pipeline.train_dataset(ds, cfg, 16, 64, 0, p, 2)) for p in range(2)]
    for _ in range(3):
        whole = next(single)
        parts = [next(it) for it in shares]
        assert parts[0]["text"].shape == (32, 16)
        for key in ("image", "text"):  # process p holds the p-th half of the same global batch
            np.testing.assert_array_equal(np.concatenate([parts[0][key], parts[1][key]]), whole[key])


def test_eval_split_loads_every_scalar_feature(data_dir):
    cfg = _data_cfg(data_dir)
    ds = pipeline.open_dataset(cfg)
    split = pipeline.load_split(ds, cfg, "test_seen", 16, 100)
    assert split["image"].shape == (100, 32, 32, 3)
    assert split["label"].shape == (100,) and split["single_class"].dtype == bool and split["kind"].shape == (100,)
    assert ds.class_names == scenes.composition_names() == ds.class_names_of("label")
    assert ds.class_names_of("single_class") is None
    single = [c for c, m in zip(split["caption"], split["single_class"]) if m]
    assert all(" of " not in c and "above" not in c and "below" not in c for c in single)
