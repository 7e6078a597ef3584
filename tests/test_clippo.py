"""One tower (CLIPPO): captions rendered on the device, one image tower for both sides."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_tiny_config
from vlm_jax import session
from vlm_jax.data import tokenizers
from vlm_jax.errors import ConfigError
from vlm_jax.models import render

CELL, FONT = (8, 6), 8
PAGES = {"data.tokenizer": "bytes", "model.text.max_len": 20, "loss.render_cell": "(8, 6)",
         "loss.render_font_size": 8}


def test_glyphs_are_drawn_once_and_tell_letters_apart():
    atlas = render.glyph_atlas(CELL, FONT)
    again = render.glyph_atlas.__wrapped__(CELL, FONT)  # drawn afresh, not from the cache
    np.testing.assert_array_equal(atlas, again)
    visible = [ord(c) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?()"]
    assert all(atlas[c + render.TOKEN_OFFSET].max() > 0 for c in visible)  # letters, digits, punctuation have ink
    assert atlas[ord(" ") + render.TOKEN_OFFSET].max() == 0 and atlas[0].max() == 0 and atlas[1].max() == 0
    letters = {atlas[ord(c) + render.TOKEN_OFFSET].tobytes() for c in "abcdefghijklmnopqrstuvwxyz"}
    assert len(letters) == 26


def test_pages_put_each_byte_in_its_cell():
    tok = tokenizers.ByteTokenizer()
    tokens = tokenizers.tokenize(tok, ["a red circle above", "x"], 20)
    pages = np.asarray(render.render(jnp.asarray(tokens), 32, CELL, FONT))
    assert pages.shape == (2, 32, 32, 3) and pages.dtype == np.uint8
    atlas = render.glyph_atlas(CELL, FONT)
    cols = 32 // CELL[1]
    for k, t in enumerate(tokens[0]):
        r, c = divmod(k, cols)
        cell = pages[0, r * CELL[0]:(r + 1) * CELL[0], c * CELL[1]:(c + 1) * CELL[1], 0]
        np.testing.assert_array_equal(cell, 255 - atlas[t])  # dark ink on a white page
    assert (pages[1, CELL[0]:] == 255).all()  # one character: the rest of the page is blank
    with pytest.raises(ValueError, match="do not fit"):
        render.render(jnp.zeros((1, 21), jnp.int32), 32, CELL, FONT)


def test_the_config_is_checked_before_anything_runs(data_dir):
    with pytest.raises(ConfigError, match="config.data.tokenizer: CLIPPO renders byte tokens"):
        load_tiny_config(data_dir, "configs/default.py:clippo", **{**PAGES, "data.tokenizer": "sentencepiece"})
    with pytest.raises(ConfigError, match="config.model.text.max_len: 21 characters do not fit"):
        load_tiny_config(data_dir, "configs/default.py:clippo", **{**PAGES, "model.text.max_len": 21})
    # configs/default.py:clippo makes render_size a reference to data.image_size; by hand it must match.
    with pytest.raises(ConfigError, match="config.loss.render_size: the pages go through the image tower"):
        load_tiny_config(data_dir, "configs/default.py", **{**PAGES, "loss.kind": "clippo", "loss.render_size": 64})


def test_one_tower_encodes_text_as_the_image_of_its_page(data_dir):
    cfg = load_tiny_config(data_dir, "configs/default.py:clippo", **PAGES)
    run = session.setup(cfg)
    params = jax.jit(run.init_state, out_shardings=run.state_sh)(jax.random.PRNGKey(0))["params"]
    assert "text" not in params and "txt_proj" not in params and {"image", "img_proj", "log_t"} <= set(params)
    emb = run.objective.embedder()
    tokens = jnp.asarray(tokenizers.tokenize(run.ds.tokenizer, ["a red circle", "two blue squares"], 20))
    pages = render.render(tokens, 32, CELL, FONT)
    np.testing.assert_allclose(emb.texts(params, tokens), emb.images(params, pages), atol=1e-6)
    z = np.asarray(emb.texts(params, tokens))
    assert not np.allclose(z[0], z[1])  # different words, different embeddings
