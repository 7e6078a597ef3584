"""Exact gradient accumulation: k micro-batches give the full-batch gradients."""

import jax
import numpy as np
import pytest

from conftest import load_tiny_config
from vlm_jax import metrics, parallel, session, step as step_lib, train
from vlm_jax.data import pipeline


def _setup_and_batch(data_dir, spec, **extra):
    cfg = load_tiny_config(data_dir, spec, **extra)
    run = session.setup(cfg)
    params = jax.jit(run.init_state, out_shardings=run.state_sh)(jax.random.PRNGKey(0))["params"]
    stream = pipeline.train_dataset(run.ds, cfg.data, cfg.model.text.max_len, cfg.train.batch_size, 0,
                                    fields=run.objective.example_fields, augment=run.objective.augment)
    local = next(iter(stream))
    sh = parallel.batch_sharding(run.mesh)
    batch = {k: jax.make_array_from_process_local_data(sh, v) for k, v in local.items()}
    return cfg, run, params, batch


NO_STEM = {"model.image.stem": "()", "model.image.patch_size": 4}  # MAE's ViT: patches see only their own pixels


# k = 4 once (CLIP); every objective at k = 2 (each k is a compile of its own).
# CLIP's cell stays in the quick loop (-m "not slow"); the other objectives' cells are marked slow.
@pytest.mark.parametrize("spec,extra,ks", [("configs/default.py", {}, (2, 4))] + [
    pytest.param(spec, extra, (2,), marks=pytest.mark.slow)
    for spec, extra in [("configs/default.py:sigmoid", {}), ("configs/default.py:slip", {}), ("configs/default.py:coca", {}),
                        ("configs/default.py:albef", {}), ("configs/default.py:region", {}),
                        ("configs/default.py:negclip", {}), ("configs/vit.py:mae", NO_STEM)]])
def test_accumulated_gradients_equal_full_batch_gradients(data_dir, spec, extra, ks):
    cfg, run, params, batch = _setup_and_batch(data_dir, spec, **extra)
    objective = run.objective
    (loss1, _), g1 = jax.jit(step_lib.make_grad_fn(objective, run.mesh, 1))(params, batch)
    for k in ks:
        (loss_k, _), gk = jax.jit(step_lib.make_grad_fn(objective, run.mesh, k))(params, batch)
        np.testing.assert_allclose(loss_k, loss1, rtol=1e-6)
        flat1 = jax.tree_util.tree_leaves_with_path(g1)
        flatk = dict(jax.tree_util.tree_leaves_with_path(gk))
        # Some gradients are zero in exact arithmetic (attention key biases):
        # measure those against the largest gradient instead of their own noise.
        floor = 1e-3 * max(float(np.abs(np.asarray(a)).max()) for _, a in flat1)
        for path, a in flat1:
            b = flatk[path]
            scale = float(np.abs(np.asarray(a)).max()) + floor
            err = float(np.abs(np.asarray(a) - np.asarray(b)).max()) / scale
            assert err < 2e-5, (k, parallel.path_str(path), err)
        # the temperature (and bias) gradient is taken once, not k times
        np.testing.assert_allclose(gk["log_t"], g1["log_t"], rtol=2e-5)
        if "bias" in g1:
            np.testing.assert_allclose(gk["bias"], g1["bias"], rtol=2e-5)


@pytest.mark.slow
def test_ten_steps_with_accumulation_match_the_plain_run(data_dir, tmp_path):
    rows = {}
    for k in (1, 2):
        cfg = load_tiny_config(data_dir, **{"train.steps": 10, "train.accum_steps": k, "train.eval_every": 0,
                                            "train.checkpoint_every": 100, "train.log_every": 1})
        train.train(cfg, str(tmp_path / f"k{k}"))
        rows[k] = [r["train/loss"] for r in metrics.read_metrics(str(tmp_path / f"k{k}"))]
    np.testing.assert_allclose(rows[2], rows[1], rtol=1e-4)


def test_accum_steps_must_split_the_per_device_batch(data_dir, tmp_path):
    with pytest.raises(SystemExit, match="config.train.accum_steps"):
        train.main(["--config", "configs/default.py", "--workdir", str(tmp_path),
                    "--config.data.data_dir=" + data_dir, "--config.data.dataset_config=tiny",
                    "--config.train.batch_size=32", "--config.train.accum_steps=3"])


def test_accumulation_lowers_compiled_step_memory(data_dir):
    temps = {}
    for k in (1, 4):
        cfg = load_tiny_config(data_dir, **{"train.batch_size": 256, "train.accum_steps": k})
        run = session.setup(cfg)
        step = step_lib.make_train_step(cfg, run.objective, run.tx, run.schedule, run.mesh, run.state_sh)
        sh = parallel.batch_sharding(run.mesh)
        batch = {"image": jax.ShapeDtypeStruct((256, 32, 32, 3), "uint8", sharding=sh),
                 "text": jax.ShapeDtypeStruct((256, 16), "int32", sharding=sh)}
        compiled = step.lower(session.with_shardings(run.abstract, run.state_sh), batch).compile()
        temps[k] = compiled.memory_analysis().temp_size_in_bytes
    assert temps[4] < 0.6 * temps[1], temps
