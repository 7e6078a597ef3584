"""Published model shapes have the published parameter counts."""

import importlib.util

import jax
import numpy as np
import pytest

from vlm_jax import models, objectives, session

spec = importlib.util.spec_from_file_location("published_configs", "configs/published.py")
published = importlib.util.module_from_spec(spec)
spec.loader.exec_module(published)

# Parameter counts of the released models, as open_clip 3.3 builds them
# (RN50, RN101, ViT-B-32, ViT-B-16, ViT-L-14, ViT-H-14, ViT-B-16-SigLIP,
# ViT-SO400M-14-SigLIP-384; the CLIP ones equal OpenAI's checkpoints).
PUBLISHED = {
    "clip_rn50": 102_007_137,
    "clip_rn101": 119_688_033,
    "clip_vit_b32": 151_277_313,
    "clip_vit_b16": 149_620_737,
    "clip_vit_l14": 427_616_513,
    "openclip_vit_b32": 151_277_313,
    "openclip_vit_b16": 149_620_737,
    "openclip_vit_l14": 427_616_513,
    "openclip_vit_h14": 986_109_441,
    "siglip_b16": 203_155_970,
    "siglip_so400m14": 877_960_498,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_the_release(name):
    c = published.get_config(name)
    model = models.make_model(c.model, 100)  # the config's own vocabulary overrides 100
    init = session.make_init_params(c, model, objectives.make(c, model, None))  # towers + log_t (+ SigLIP's bias)
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    assert n == PUBLISHED[name], (name, n)


def test_unknown_published_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'clip_vit_h99'"):
        published.get_config("clip_vit_h99")


# openclip_vit_b32/b16/l14 have the shapes of clip_vit_* (only the activation
# differs); clip_rn101 differs from clip_rn50 in depth alone
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(n for n in PUBLISHED if n not in ("openclip_vit_b32", "openclip_vit_b16",
                                                                         "openclip_vit_l14", "clip_rn101")))
def test_every_published_shape_loads_initialises_and_trains_a_step_at_depth_one(name, data_dir):
    """As published (image size, patch, widths, vocabulary: So400m/14 at 384 px
    has 27 × 27 patches, the remainder dropped), with one block per tower
    (per ResNet stage)."""
    from vlm_jax import config as config_lib, parallel, step as step_lib
    from vlm_jax.bench.throughput import synthetic_batch

    resnet = name.startswith("clip_rn")
    overrides = [f"data.data_dir={data_dir}", "data.dataset_config=tiny", "model.text.depth=1",
                 "model.image." + ("layers=(1, 1, 1, 1)" if resnet else "depth=1"),
                 "train.batch_size=2", "mesh.data=1"]  # one device, two examples
    cfg = config_lib.load_config(f"configs/published.py:{name}", overrides)
    run = session.setup(cfg)
    state = jax.jit(run.init_state, out_shardings=run.state_sh)(jax.random.PRNGKey(0))
    if resnet:  # 224 px reduced 32-fold: 7 x 7 positions and the mean
        pos = state["params"]["image"]["attn_pool"]["pos_embed"]
        assert pos.shape[1] == 7 * 7 + 1, (name, pos.shape)
    else:
        patches = (cfg.data.image_size // cfg.model.image.patch_size) ** 2
        pos = state["params"]["image"]["pos_embed"]
        assert pos.shape[1] == patches + (cfg.model.image.pool == "cls"), (name, pos.shape)  # a class token has its own
    step = step_lib.make_train_step(cfg, run.objective, run.tx, run.schedule, run.mesh, run.state_sh)
    sh = parallel.batch_sharding(run.mesh)
    batch = {k: jax.device_put(v, sh) for k, v in synthetic_batch(cfg, run, 2).items()}
    state, out = step(state, batch)
    assert bool(out[step_lib.FINITE]) and np.isfinite(float(out["train/loss"]))
