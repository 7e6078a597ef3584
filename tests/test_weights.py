"""Published weights in and out (vlm_jax.weights, vlm_jax.convert).

Formats are read and written without torch and checked against each other;
the layouts round-trip bit-exactly; the ``peer`` tests build reduced OpenCLIP
models of each published family in the isolated torch environment
(``tests/peers/open_clip_models.py``) and compare embeddings and logits.
"""

import collections
import importlib.util
import json
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from conftest import load_tiny_config
from vlm_jax import config as config_lib, convert, evaluate, models, objectives, rules, session, train, weights
from vlm_jax.errors import ConfigError
from vlm_jax.weights import formats, links

PEERS = os.path.join(os.path.dirname(__file__), "peers", "open_clip_models.py")
PUBLISHED = {"clip": "clip_vit_b32", "openclip": "openclip_vit_b32", "siglip": "siglip_b16"}
# The peer script's reduced shapes: the families' structure at width 64, depth 2, 32 px.
REDUCED = {"model.image.patch_size": 8, "model.image.width": 64, "model.image.depth": 2, "model.image.mlp_dim": 256,
           "model.image.num_heads": 4, "data.image_size": 32, "model.text.max_len": 16, "model.text.vocab_size": 128,
           "model.text.width": 64, "model.text.depth": 2, "model.text.mlp_dim": 256, "model.text.num_heads": 4}
# OpenCLIP's SigLIP port computes the exact GELU in both towers where big_vision (and our siglip_*) uses tanh.
AS_OPEN_CLIP = {"siglip": {"model.image.act": "gelu", "model.text.act": "gelu"}}


def reduced(family: str, **extra):
    values = {**REDUCED, "model.embed_dim": 64 if family == "siglip" else 48, **AS_OPEN_CLIP.get(family, {}), **extra}
    return config_lib.load_config(f"configs/published.py:{PUBLISHED[family]}", [f"{k}={v}" for k, v in values.items()])


def model_and_abstract(c):
    model = models.make_model(c.model, 128)
    objective = objectives.make(c, model, None)
    init = session.make_init_params(c, model, objective)
    return model, objective, init


def random_params(c, seed=0):
    """The config's parameters with every array perturbed (no LayerNorm of ones, no zero bias)."""
    _, objective, init = model_and_abstract(c)
    flat = rules._flat(jax.device_get(init(jax.random.PRNGKey(seed))))
    rng = np.random.default_rng(seed)
    return {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in flat.items()}, objective


def abstract_of(c):
    _, objective, init = model_and_abstract(c)
    return rules._flat(jax.eval_shape(init, jax.random.PRNGKey(0))), objective


# --------------------------------------------------------------------------- formats


TENSORS = {"a.weight": np.arange(12, dtype=np.float32).reshape(3, 4) / 7, "scalar": np.asarray(np.float32(2.5)),
           "ids": np.arange(5, dtype=np.int64), "half": np.linspace(-1, 1, 6, dtype=np.float16).reshape(2, 3),
           "bf16": np.linspace(-2, 2, 4).astype(ml_dtypes.bfloat16), "empty": np.zeros((0, 3), np.float32)}


@pytest.mark.parametrize("ext", [".safetensors", ".pt", ".npz"])
def test_formats_round_trip_bit_exactly(tmp_path, ext):
    path = str(tmp_path / f"x{ext}")
    formats.write(path, TENSORS)
    back = formats.read(path)
    assert set(back) == set(TENSORS)
    for k, v in TENSORS.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert back[k].tobytes() == v.tobytes(), k


def test_torch_reader_refuses_anything_but_tensors(tmp_path):
    """The unpickler admits only a state dict's names: a pickled callable is refused, never run."""
    path = str(tmp_path / "evil.pt")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": collections.Counter("ab")}))
    with pytest.raises(formats.FormatError, match=r"evil.pt: holds a collections.Counter object"):
        formats.read(path)
    nested = str(tmp_path / "trainer.pt")
    formats.write(nested, {"w": np.ones(2, np.float32)})
    assert set(formats.read(nested)) == {"w"}


def test_damaged_files_are_named(tmp_path):
    path = str(tmp_path / "w.safetensors")
    formats.write(path, TENSORS)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 8)
    with pytest.raises(formats.FormatError, match=r"w.safetensors: tensor .* is truncated"):
        formats.read(path)
    with pytest.raises(formats.FormatError, match=r"unknown checkpoint extension '.ckpt2'"):
        formats.read(str(tmp_path / "w.ckpt2"))
    (tmp_path / "old.pt").write_bytes(b"\x80\x02legacy")
    with pytest.raises(formats.FormatError, match=r"old.pt: not a zip-format torch checkpoint"):
        formats.read(str(tmp_path / "old.pt"))


# --------------------------------------------------------------------------- layouts


CASES = [("clip", "open_clip", False), ("openclip", "open_clip", True), ("siglip", "open_clip", False),
         ("siglip", "big_vision", False), ("siglip", "big_vision", True)]


@pytest.mark.parametrize("family,layout,scan", CASES)
def test_export_then_import_is_bit_exact(tmp_path, family, layout, scan):
    c = reduced(family, **{"model.scan": scan})
    params, objective = random_params(c)
    path = str(tmp_path / ("w.npz" if layout == "big_vision" else "w.safetensors"))
    assert weights.export_params(params, c, objective.scalar_names, path) == layout
    back, found = weights.import_params(path, c, abstract_of(c)[0], objective.scalar_names)
    assert found == layout and set(back) == set(params)
    for k in params:
        assert back[k].dtype == params[k].dtype and back[k].tobytes() == params[k].tobytes(), k


def test_big_vision_keys_are_the_documented_ones(tmp_path):
    """A depth-1 SigLIP exported as big_vision names exactly the modules
    big_vision's vit.py, text_transformer.py and two_towers.py create."""
    c = reduced("siglip", **{"model.image.depth": 1, "model.text.depth": 1})
    params, objective = random_params(c)
    path = str(tmp_path / "w.npz")
    weights.export_params(params, c, objective.scalar_names, path)
    got = set(formats.read(path))
    block = [f"{ln}/{p}" for ln in ("LayerNorm_0", "LayerNorm_1") for p in ("scale", "bias")] + \
            [f"MultiHeadDotProductAttention_0/{x}/{p}" for x in ("query", "key", "value", "out") for p in ("kernel", "bias")] + \
            [f"MlpBlock_0/Dense_{i}/{p}" for i in (0, 1) for p in ("kernel", "bias")]
    want = {"params/img/embedding/kernel", "params/img/embedding/bias", "params/img/pos_embedding",
            "params/img/Transformer/encoder_norm/scale", "params/img/Transformer/encoder_norm/bias",
            "params/img/MAPHead_0/probe", "params/txt/Embed_0/embedding", "params/txt/pos_embedding",
            "params/txt/Encoder_0/encoder_norm/scale", "params/txt/Encoder_0/encoder_norm/bias",
            "params/txt/head/kernel", "params/txt/head/bias", "params/t", "params/b"}
    want |= {f"params/img/Transformer/encoderblock_0/{k}" for k in block}
    want |= {f"params/txt/Encoder_0/encoderblock_0/{k}" for k in block}
    want |= {f"params/img/MAPHead_0/{k}" for k in block if not k.startswith("LayerNorm_1")}
    assert got == want, (sorted(got - want), sorted(want - got))
    # big_vision's scan=True layout (one "encoderblock" with a depth axis) reads the same
    flat = formats.read(path)
    scanned = {k.replace("encoderblock_0/", "encoderblock/"): (v[None] if "encoderblock_0/" in k else v)
               for k, v in flat.items()}
    formats.write(str(tmp_path / "scanned.npz"), scanned)
    a, _ = weights.import_params(path, c, abstract_of(c)[0], objective.scalar_names)
    b, _ = weights.import_params(str(tmp_path / "scanned.npz"), c, abstract_of(c)[0], objective.scalar_names)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_a_file_that_does_not_fit_lists_every_problem(tmp_path):
    c = reduced("clip")
    params, objective = random_params(c)
    path = str(tmp_path / "w.safetensors")
    weights.export_params(params, c, objective.scalar_names, path)
    other = reduced("clip", **{"model.image.depth": 3, "model.text.mlp_dim": 128})
    with pytest.raises(ConfigError) as e:
        weights.import_params(path, other, abstract_of(other)[0], objective.scalar_names)
    msg = str(e.value)
    assert "w.safetensors (open_clip layout) does not fit the config's model" in msg
    assert "missing: visual.transformer.resblocks.2.ln_1.weight" in msg
    assert "mis-shaped: transformer.resblocks.0.mlp.c_fc.weight (256, 64) -> text/encoder/block0/mlp/fc1/kernel" in msg
    # in each of the text tower's two blocks: c_fc's weight and bias, c_proj's weight
    assert msg.count("mis-shaped") == 2 * 3
    extra = dict(formats.read(path), **{"visual.extra.weight": np.ones(3, np.float32)})
    formats.write(str(tmp_path / "extra.safetensors"), extra)
    with pytest.raises(ConfigError, match=r"unexpected: visual.extra.weight \(3,\)"):
        weights.import_params(str(tmp_path / "extra.safetensors"), c, abstract_of(c)[0], objective.scalar_names)
    with pytest.raises(ConfigError, match=r"model.image.pool: OpenCLIP's layouts hold 'cls' or 'map', not 'gap'"):
        weights.export_params(params, reduced("clip", **{"model.image.pool": "gap"}), objective.scalar_names, path)
    with pytest.raises(ConfigError, match=r"model.image.tower='resnet': this layout holds ViTs only"):
        weights.export_params(params, reduced("clip", **{"model.image.tower": "resnet"}), objective.scalar_names, path)


def test_position_embedding_resampling():
    m = links.resize_matrix(5, 5)
    np.testing.assert_allclose(m, np.eye(5), atol=1e-12)  # same size: identity
    for n_in, n_out in ((4, 7), (7, 3), (6, 12)):
        m = links.resize_matrix(n_in, n_out)
        np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-12)  # a constant grid stays constant
    pe = np.random.default_rng(0).standard_normal((1, 1 + 16, 8)).astype(np.float32)
    out = links.resize_posemb(pe, (1, 1 + 36, 8), extra=1)
    assert out.shape == (1, 37, 8) and np.array_equal(out[0, 0], pe[0, 0])  # the class token's is kept
    assert links.resize_posemb(pe, (1, 1 + 35, 8), extra=1) is None  # not a square grid


def test_an_open_clip_trainer_checkpoint_is_read_through_its_wrappers(tmp_path):
    """OpenCLIP's trainer saves {"state_dict": {"module.visual...": ...}, "epoch": ...}."""
    c = reduced("clip")
    params, objective = random_params(c)
    plain = str(tmp_path / "w.safetensors")
    weights.export_params(params, c, objective.scalar_names, plain)
    wrapped = {f"state_dict.module.{k}": v for k, v in formats.read(plain).items()}
    formats.write(str(tmp_path / "epoch_3.pt"), wrapped)
    back, layout = weights.import_params(str(tmp_path / "epoch_3.pt"), c, abstract_of(c)[0], objective.scalar_names)
    assert layout == "open_clip" and all(np.array_equal(back[k], params[k]) for k in params)


def test_import_at_another_image_size_resamples_the_position_embedding(tmp_path):
    c = reduced("clip")
    params, objective = random_params(c)
    path = str(tmp_path / "w.safetensors")
    weights.export_params(params, c, objective.scalar_names, path)
    bigger = reduced("clip", **{"data.image_size": 48})  # a 6 x 6 grid instead of 4 x 4
    back, _ = weights.import_params(path, bigger, abstract_of(bigger)[0], objective.scalar_names)
    pe = formats.read(path)["visual.positional_embedding"]
    assert back["image/pos_embed"].shape == (1, 37, 64)
    np.testing.assert_array_equal(back["image/pos_embed"][0, 0], pe[0])  # the class token's entry
    np.testing.assert_allclose(back["image/pos_embed"][0, 1:], links.resize_grid(pe[1:], (4, 4), (6, 6)), rtol=1e-6)
    assert all(np.array_equal(back[k], params[k]) for k in params if k != "image/pos_embed")


# --------------------------------------------------------------------------- the command


def _tiny_published(data_dir, family, **extra):
    values = {**REDUCED, "model.embed_dim": 64 if family == "siglip" else 48, **AS_OPEN_CLIP.get(family, {}),
              "train.steps": 2, "train.eval_every": 0, "model.image.stem": "()", **extra}  # no tiny-ViT stem
    return load_tiny_config(data_dir, f"configs/published.py:{PUBLISHED[family]}", **values)


@pytest.mark.slow
def test_convert_writes_a_workdir_that_evaluate_train_and_lit_take(data_dir, tmp_path):
    c = _tiny_published(data_dir, "clip")
    params, objective = random_params(c)
    source = str(tmp_path / "clip.safetensors")
    weights.export_params(params, c, objective.scalar_names, source)
    workdir = str(tmp_path / "converted")
    overrides = [f"--config.{k}={v}" for k, v in {**REDUCED, "model.embed_dim": 48, "data.data_dir": data_dir,
                                                  "data.dataset_config": "tiny", "train.progress": False}.items()]
    args = ["--config", "configs/published.py:clip_vit_b32", "--workdir", workdir, *overrides]
    convert.main([*args, "--source", source])
    record = json.load(open(os.path.join(workdir, "converted.json")))
    assert record["layout"] == "open_clip" and record["parameters"] == sum(v.size for v in params.values())
    loaded, step = rules.load_params(workdir)
    assert step == 0 and all(np.array_equal(loaded[k], params[k]) for k in params)
    # evaluate takes it with the same config
    step, metrics, _ = evaluate.evaluate_checkpoint(
        _tiny_published(data_dir, "clip", **{"train.eval_every": 8}), workdir)
    assert step == 0 and "zeroshot/test_seen/top1" in metrics
    # export of the workdir gives the file back
    convert.main([*args, "--export", str(tmp_path / "back.safetensors")])
    a, b = formats.read(source), formats.read(str(tmp_path / "back.safetensors"))
    assert set(a) == set(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
    # a second import into the same workdir is refused, and nothing there changes
    with pytest.raises(SystemExit, match=r"error: --workdir .* already holds checkpoints"):
        convert.main([*args, "--source", source])
    # LiT from the converted image tower, from configs/lit.py alone (plus the tiny data)
    lit = config_lib.load_config(f"configs/lit.py:{workdir}", [
        f"data.data_dir={data_dir}", "data.dataset_config=tiny", "train.steps=3", "train.eval_every=0",
        "train.batch_size=32", "train.progress=False"])
    assert lit.model.image.ln_pre and lit.model.image.act == "quick_gelu" and lit.model.embed_dim == 48
    train.train(lit, str(tmp_path / "lit"))
    after, _ = rules.load_params(str(tmp_path / "lit"))
    for k in params:
        if k.startswith(("image/", "img_proj/")):
            assert np.array_equal(after[k], params[k]), k
    # fine-tuning: every parameter initialised from it (at learning rate 0 they stay its own)
    tune = _tiny_published(data_dir, "clip", **{"model_init.workdir": workdir, "optim.lr": 0.0,
                                                 "model_init.rules": '(("^(.*)$", r"\\1"),)'})
    train.train(tune, str(tmp_path / "tune"))
    tuned, step = rules.load_params(str(tmp_path / "tune"))
    assert step == 2 and all(np.array_equal(tuned[k], params[k]) for k in params)


def test_a_conversion_whose_checkpoint_write_fails_is_an_error_line(data_dir, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    c = _tiny_published(data_dir, "clip")
    params, objective = random_params(c)
    source = str(tmp_path / "clip.safetensors")
    weights.export_params(params, c, objective.scalar_names, source)

    def failing(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", failing)
    workdir = str(tmp_path / "converted")
    overrides = [f"--config.{k}={v}" for k, v in {**REDUCED, "model.embed_dim": 48, "data.data_dir": data_dir,
                                                  "data.dataset_config": "tiny"}.items()]
    with pytest.raises(SystemExit, match=r"^error: writing checkpoint 0 to --workdir .*converted failed "
                                         r"\(.*No space left on device\); free space"):
        convert.main(["--config", "configs/published.py:clip_vit_b32", "--workdir", workdir, *overrides,
                      "--source", source])
    assert not os.path.exists(os.path.join(workdir, "converted.json"))
    assert not os.path.exists(os.path.join(workdir, "config.json"))


def test_convert_errors_are_one_line(data_dir, tmp_path):
    args = ["--config", "configs/published.py:clip_vit_b32", "--workdir", str(tmp_path / "w"),
            f"--config.data.data_dir={data_dir}", "--config.data.dataset_config=tiny",
            *[f"--config.{k}={v}" for k, v in REDUCED.items()]]
    with pytest.raises(SystemExit, match=r"^error: .*nothing.safetensors: no such file$"):
        convert.main([*args, "--source", str(tmp_path / "nothing.safetensors")])
    np.savez(str(tmp_path / "other.npz"), w=np.ones(2))
    with pytest.raises(SystemExit, match=r"error: .*other.npz: neither an OpenCLIP state dict"):
        convert.main([*args, "--source", str(tmp_path / "other.npz")])
    with pytest.raises(SystemExit, match=r"error: give either --source FILE"):
        convert.main(args)
    assert not os.path.exists(str(tmp_path / "w" / "checkpoints"))


# --------------------------------------------------------------------------- against OpenCLIP itself


@pytest.fixture(scope="module")
def peer_models(tmp_path_factory):
    """OUT/<family>/{weights.safetensors, weights.pt, io.npz}, written by open_clip."""
    from vlm_jax.bench import peer_env

    python = peer_env.ensure_venv()
    out = str(tmp_path_factory.mktemp("open_clip_models"))
    info = json.loads(peer_env.run_script(python, PEERS, "make", out).strip().splitlines()[-1])
    return out, python, info


def _outputs(c, params: dict, x01: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
    model, _, _ = model_and_abstract(c)
    tree = rules._unflat({k: jnp.asarray(v) for k, v in params.items()})
    zi, zt = jax.jit(model.apply)({"params": tree}, jnp.asarray(x01 * 2 - 1), jnp.asarray(tokens, jnp.int32))
    logits = np.exp(np.float64(params["log_t"])) * np.asarray(zi, np.float64) @ np.asarray(zt, np.float64).T
    return {"img": np.asarray(zi), "txt": np.asarray(zt), "logits": logits + float(params.get("bias", 0.0))}


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.mark.peer
@pytest.mark.parametrize("family", sorted(PUBLISHED))
def test_embeddings_and_logits_equal_open_clip(peer_models, family):
    out, _, info = peer_models
    c = reduced(family)
    abstract, objective = abstract_of(c)
    io_ = np.load(os.path.join(out, family, "io.npz"))
    errors = {}
    for ext in ("safetensors", "pt"):
        params, layout = weights.import_params(os.path.join(out, family, f"weights.{ext}"), c, abstract,
                                               objective.scalar_names)
        assert layout == "open_clip"
        got = _outputs(c, params, io_["x01"], io_["tokens"])
        for k in ("img", "txt", "logits"):
            errors[f"{ext}/{k}"] = _rel(got[k], io_[k])
    assert max(errors.values()) < 1e-5, errors
    print(f"\nparity {family} (open_clip {info['open_clip']}, torch {info['torch']}): {errors}")


@pytest.mark.peer
@pytest.mark.parametrize("field,value,output", [("act", "gelu_tanh", "img"), ("pad_id", 0, "txt")])
def test_the_family_options_are_part_of_the_computation(peer_models, field, value, output):
    """The same SigLIP weights with big_vision's tanh GELU instead of open_clip's
    exact one, or with the 0-padding seen instead of the EOS padding SigLIP's
    tokenizers give, compute measurably different embeddings."""
    out, _, _ = peer_models
    towers = ("image", "text") if field == "act" else ("text",)
    c = reduced("siglip", **{f"model.{t}.{field}": value for t in towers})
    abstract, objective = abstract_of(c)
    params, _ = weights.import_params(os.path.join(out, "siglip", "weights.safetensors"), c, abstract,
                                      objective.scalar_names)
    io_ = np.load(os.path.join(out, "siglip", "io.npz"))
    assert _rel(_outputs(c, params, io_["x01"], io_["tokens"])[output], io_[output]) > 1e-4


@pytest.mark.peer
@pytest.mark.parametrize("family", sorted(PUBLISHED))
def test_import_then_export_reproduces_the_peer_file(peer_models, tmp_path, family):
    out, _, _ = peer_models
    c = reduced(family)
    abstract, objective = abstract_of(c)
    source = os.path.join(out, family, "weights.safetensors")
    params, _ = weights.import_params(source, c, abstract, objective.scalar_names)
    weights.export_params(params, c, objective.scalar_names, str(tmp_path / "back.safetensors"))
    a, b = formats.read(source), formats.read(str(tmp_path / "back.safetensors"))
    ignored = [k for k in a if weights.open_clip.ignored(k)]
    assert set(a) - set(ignored) == set(b), sorted(set(a) ^ set(b))
    for k in b:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


@pytest.mark.peer
def test_open_clip_loads_our_exports_strictly(peer_models):
    """Exported .safetensors and .pt (written without torch) load with
    load_state_dict(strict=True) and give open_clip's own outputs back."""
    out, python, _ = peer_models
    from vlm_jax.bench import peer_env

    for family in PUBLISHED:
        c = reduced(family)
        abstract, objective = abstract_of(c)
        params, _ = weights.import_params(os.path.join(out, family, "weights.pt"), c, abstract, objective.scalar_names)
        for ext in ("safetensors", "pt"):
            weights.export_params(params, c, objective.scalar_names, os.path.join(out, family, f"exported.{ext}"))
    report = json.loads(peer_env.run_script(python, PEERS, "load", out).strip().splitlines()[-1])
    assert sorted(report) == sorted(f"{f}.{e}" for f in PUBLISHED for e in ("safetensors", "pt"))
    for family in PUBLISHED:
        want = np.load(os.path.join(out, family, "io.npz"))
        for ext in ("safetensors", "pt"):
            got = np.load(os.path.join(out, family, f"reloaded_{ext}.npz"))
            for k in ("img", "txt", "logits"):
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"{family} {ext} {k}")


@pytest.mark.peer
def test_position_embedding_resampling_equals_open_clip(peer_models):
    out, _, _ = peer_models
    pe = formats.read(os.path.join(out, "clip", "weights.safetensors"))["visual.positional_embedding"]
    for size in (48, 24, 56):  # grids 6, 3 and 7 from 4: up, down and an odd factor
        want = np.load(os.path.join(out, "clip", f"posemb_{size}.npy"))
        got = links.resize_posemb(pe[None], (1, want.shape[0], pe.shape[1]), extra=1)[0]
        assert _rel(got, want) < 1e-6, size


@pytest.mark.peer
def test_torchscript_archives_need_torch_and_say_so(peer_models):
    out, _, _ = peer_models
    path = os.path.join(out, "torchscript.pt")
    if importlib.util.find_spec("torch") is None:  # vlm_jax's own environment: no torch
        with pytest.raises(formats.FormatError, match=r"torchscript.pt is a TorchScript archive .* needs torch"):
            formats.read(path)
    else:
        assert set(formats.read(path)) == {"weight", "bias"}


@pytest.mark.peer
def test_siglip_through_big_vision_layout_keeps_open_clip_outputs(peer_models, tmp_path):
    """OpenCLIP's SigLIP -> vlm_jax -> big_vision .npz -> vlm_jax: still open_clip's outputs."""
    out, _, _ = peer_models
    c = reduced("siglip")
    abstract, objective = abstract_of(c)
    params, _ = weights.import_params(os.path.join(out, "siglip", "weights.safetensors"), c, abstract,
                                      objective.scalar_names)
    weights.export_params(params, c, objective.scalar_names, str(tmp_path / "siglip.npz"))
    again, layout = weights.import_params(str(tmp_path / "siglip.npz"), c, abstract, objective.scalar_names)
    assert layout == "big_vision"
    io_ = np.load(os.path.join(out, "siglip", "io.npz"))
    got = _outputs(c, again, io_["x01"], io_["tokens"])
    assert max(_rel(got[k], io_[k]) for k in ("img", "txt", "logits")) < 1e-5
