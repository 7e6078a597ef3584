"""Config mistakes fail at start-up with one message naming the field; nothing is lost."""

import os

import pytest

from conftest import tiny_overrides
from vlm_jax import config as config_lib, train


def _run(workdir, *overrides, data_dir=None, config="configs/default.py"):
    argv = ["--config", config, "--workdir", str(workdir)]
    if data_dir:
        argv += tiny_overrides(data_dir)
    argv += list(overrides)
    with pytest.raises(SystemExit) as info:
        train.main(argv)
    return str(info.value)


def test_misspelt_override_names_the_field_and_suggests(tmp_path):
    msg = _run(tmp_path, "--config.train.stpes=3")
    assert "config.train.stpes" in msg and "did you mean 'steps'" in msg
    assert "config.modle" in _run(tmp_path, "--config.modle.embed_dim=3")


def test_wrongly_typed_override_names_the_field(tmp_path):
    assert "config.train.steps" in _run(tmp_path, "--config.train.steps=many")


def test_misspelt_field_in_a_config_file_names_it(tmp_path):
    path = tmp_path / "forked.py"
    path.write_text(
        "from vlm_jax.config import base_config\n"
        "def get_config():\n"
        "    c = base_config()\n"
        "    c.model.image.widht = 64\n"
        "    return c\n"
    )
    msg = _run(tmp_path, config=str(path))
    assert "widht" in msg and "width" in msg and "forked.py" in msg


def test_batch_not_divisible_by_data_devices(tmp_path, data_dir):
    msg = _run(tmp_path, "--config.train.batch_size=12", data_dir=data_dir)
    assert "config.train.batch_size: 12 is not divisible by the 8 data-parallel devices" in msg


def test_missing_dataset(tmp_path, data_dir):
    msg = _run(tmp_path, "--config.data.dataset=no_such_dataset", data_dir=data_dir)
    assert "config.data.dataset" in msg and "no_such_dataset" in msg


def test_missing_tokenizer(tmp_path, data_dir):
    msg = _run(tmp_path, f"--config.data.tokenizer_path={tmp_path}/missing.model", data_dir=data_dir)
    assert "config.data.tokenizer_path" in msg and "missing.model" in msg


def test_missing_config_file(tmp_path):
    assert "no config file" in _run(tmp_path, config=str(tmp_path / "nope.py"))


def test_workdir_from_an_incompatible_config_is_refused_and_left_intact(trained_softmax, data_dir):
    workdir, rows = trained_softmax
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    with open(os.path.join(workdir, "config.json")) as f:
        config_before = f.read()
    msg = _run(workdir, "--config.model.image.width=48", data_dir=data_dir)
    assert "incompatible config" in msg
    assert "config.model.image.width is 32 in the checkpoint but 48 now" in msg
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
    with open(os.path.join(workdir, "config.json")) as f:
        assert f.read() == config_before
    from vlm_jax import metrics

    assert metrics.read_metrics(workdir) == rows


def test_semantic_checks():
    c = config_lib.base_config()
    c.loss.impl = "ring_of_fire"
    with pytest.raises(config_lib.ConfigError, match=r"config.loss.impl"):
        config_lib.check_config(c)
    c = config_lib.base_config()
    c.model.image.patch_size = 64  # larger than the 32 px images
    with pytest.raises(config_lib.ConfigError, match=r"config.model.image.patch_size"):
        config_lib.check_config(c)


def test_rule_regexes_are_checked():
    c = config_lib.base_config()
    c.train.freeze = ("^image/(",)
    with pytest.raises(config_lib.ConfigError, match=r"config.train.freeze\[0\]: '\^image/\(' is not a regular expression"):
        config_lib.check_config(c)


def _schedule_reference(kind, lr, warmup, total, end_fraction, decay_fraction):
    """float64: the learning rate of every step 0 … total − 1, written out."""
    import numpy as np

    end = lr * end_fraction
    out = []
    for s in range(total):
        if s < warmup:
            out.append(lr * s / warmup)
        elif kind == "cosine":
            out.append(end + (lr - end) * 0.5 * (1 + np.cos(np.pi * (s - warmup) / (total - warmup))))
        else:
            decay = round(decay_fraction * total)
            out.append(lr if s < total - decay else lr + (end - lr) * (s - (total - decay)) / decay)
    return np.asarray(out)


@pytest.mark.parametrize("kind", ["cosine", "wsd"])
def test_learning_rate_schedules_follow_their_formulas(kind):
    import numpy as np

    from vlm_jax import optim

    cfg = config_lib.load_config("configs/default.py", [f"optim.schedule={kind}", "optim.lr=0.003",
                                                        "optim.warmup_steps=10", "optim.end_lr_fraction=0.1",
                                                        "optim.decay_fraction=0.25", "train.steps=120"])
    schedule = optim.learning_rate_schedule(cfg.optim, cfg.train.steps)
    got = np.asarray([schedule(s) for s in range(120)], np.float64)
    np.testing.assert_allclose(got, _schedule_reference(kind, 0.003, 10, 120, 0.1, 0.25), rtol=1e-5, atol=1e-9)
    if kind == "wsd":  # the peak is held until the last quarter, where the cosine has long decayed
        assert got[89] == pytest.approx(0.003) and got[89] > 2 * _schedule_reference("cosine", 0.003, 10, 120, 0.1,
                                                                                     0.25)[89]


def test_an_unknown_schedule_names_the_field_and_the_choices(tmp_path):
    msg = _run(tmp_path / "w", "--config.optim.schedule=linear")
    assert "optim.schedule" in msg and "cosine" in msg and "wsd" in msg
