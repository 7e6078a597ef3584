"""The caption decoder's evaluations: captioning (exactness per attribute)
and generative zero-shot, against direct computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_tiny_config
from vlm_jax import evaluators, session
from vlm_jax.data import pipeline, scenes, tokenizers
from vlm_jax.errors import ConfigError
from vlm_jax.evaluators import generative
from vlm_jax.evaluators.zeroshot import topk_accuracy
from vlm_jax.losses import captioning


def test_attribute_accuracy_counts_each_attribute_where_the_reference_states_it():
    refs = ["a small red circle", "three blue squares", "a red circle left of a blue square", "two cyan crosses"]
    gens = ["a large red circle", "three blue circles", "a red circle right of a blue square", "two cyan crosses"]
    got = generative.attribute_accuracy(gens, refs)
    assert got == {"colour": 1.0, "shape": 0.75, "size": 0.0, "count": 1.0, "relation": 0.0}
    # order matters: subject and object swapped is wrong on colour and shape
    swapped = generative.attribute_accuracy(["a blue square left of a red circle"], [refs[2]])
    assert swapped["colour"] == 0.0 and swapped["shape"] == 0.0 and swapped["relation"] == 1.0


def test_every_caption_of_the_data_reads_back_from_its_tokens_and_in_the_grammar(data_dir):
    cfg = load_tiny_config(data_dir)
    ds = pipeline.open_dataset(cfg.data)
    data = pipeline.load_split(ds, cfg.data, "test_seen", 48, 200)  # room for the longest caption
    rows = tokenizers.tokenize(ds.tokenizer, list(data["caption"]), 48)
    for row, caption in zip(rows, data["caption"]):
        assert tokenizers.detokenize(ds.tokenizer, row) == caption  # generated == reference tokens: exact
        assert generative.in_grammar(caption)
        assert generative.attribute_accuracy([caption], [caption]) == {
            k: 1.0 for k, v in scenes.caption_attributes(caption).items() if v}


@pytest.fixture(scope="module")
def coca(data_dir):
    cfg = load_tiny_config(data_dir, "configs/default.py:coca",
                           **{"evals.captioning.max_examples": 24, "evals.genzeroshot.max_examples": 24,
                              "evals.captioning.batch_size": 8, "evals.genzeroshot.batch_size": 8})
    run = session.setup(cfg)
    params = jax.jit(run.init_state, out_shardings=run.state_sh)(jax.random.PRNGKey(0))["params"]
    return cfg, run, params


def test_caption_logprob_is_the_teacher_forced_likelihood(coca):
    cfg, run, params = coca
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((3, cfg.data.image_size, cfg.data.image_size, 3)), jnp.float32)
    tokens = jnp.asarray(tokenizers.tokenize(run.ds.tokenizer, ["a red circle", "two blue squares"],
                                             cfg.model.text.max_len))
    got = np.asarray(jax.jit(run.objective.caption_logprob)(params, images, tokens))
    for i in range(3):
        logits = run.objective.logits(params, jnp.repeat(images[i:i + 1], 2, axis=0), tokens)
        np.testing.assert_allclose(got[i], -np.asarray(captioning.token_nll(logits, tokens)[0]), rtol=1e-5)


def test_the_generative_evaluators_report_and_match_a_direct_computation(coca):
    cfg, run, params = coca
    suite = evaluators.Suite(cfg, run.mesh, run.objective.embedder(), run.ds)
    out = suite.run(params)
    for split in ("test_seen", "test_unseen"):
        for key in ("exact", "colour", "shape", "size", "count", "relation", "in_grammar", "single/size",
                    "count/count", "relation/relation"):
            assert 0.0 <= out[f"captioning/{split}/{key}"] <= 1.0
        assert f"captioning/{split}/count/size" not in out  # a count scene's caption states no size
    # generative zero-shot top-1 from the objective's own likelihoods
    entry = cfg.evals.genzeroshot
    data = pipeline.load_split(run.ds, cfg.data, "test_seen", cfg.model.text.max_len, entry.max_examples)
    keep = data["single_class"].astype(bool)
    names = run.ds.class_names
    prompts = tokenizers.tokenize(run.ds.tokenizer, [t.format(n) for n in names for t in entry.templates],
                                  cfg.model.text.max_len)
    logp = np.asarray(jax.jit(run.objective.caption_logprob)(
        params, pipeline.normalize_images(jnp.asarray(data["image"][keep])), jnp.asarray(prompts)))
    scores = logp.reshape(len(logp), len(names), len(entry.templates)).mean(axis=2)
    want = topk_accuracy(scores, data["label"][keep].astype(np.int32))["top1"]
    assert out["genzeroshot/test_seen/top1"] == pytest.approx(want, abs=1e-9)


def test_generative_evaluators_refuse_a_model_without_a_decoder(data_dir):
    cfg = load_tiny_config(data_dir)
    with cfg.evals.unlocked():
        from vlm_jax.config import eval_entry

        cfg.evals.captioning = eval_entry("captioning", splits=("test_seen",))
    run = session.setup(cfg)
    with pytest.raises(ConfigError, match=r"config.evals.captioning: 'captioning' needs a model with a caption"):
        evaluators.Suite(cfg, run.mesh, run.objective.embedder(), run.ds)


def test_a_captioning_group_key_must_be_a_class_label(data_dir):
    cfg = load_tiny_config(data_dir, "configs/default.py:coca", **{"evals.captioning.group_key": "caption"})
    run = session.setup(cfg)
    with pytest.raises(ConfigError, match=r"config.evals.captioning.group_key: 'caption' is not a class-label"):
        evaluators.Suite(cfg, run.mesh, run.objective.embedder(), run.ds)

